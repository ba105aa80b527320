"""Claim: the chunked distillation loss (fastchat_ft/engine/distill_loss.py) gives the full-logits loss and
gradients with far less peak memory than computing both models' [tokens x vocab] logits at once.

Same inputs for both: student hidden [N, Hs] and head [V, Hs] (trained, so dW is computed too), teacher hidden
[N, Ht] and head [V, Ht], labels with ~30% ignored; forward KL at T=2, alpha 0.5, fp32.
  ours:      distill_loss(..., chunk_size=--chunk)           (custom autograd Function, chunked)
  reference: distill_loss_reference(...)                     (full logits, torch kl_div + cross_entropy, autograd)
Each runs forward + backward in a fresh subprocess; peak memory is the process's max RSS minus its RSS just
before the first call (inputs already allocated). Loss and gradients of the two are compared first.
Writes bench/results/distill_loss.json.

Run: .venv/bin/python bench/distill_loss.py [--tokens 2048] [--vocab 49152] [--chunk 256] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # bench/machine.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent


def _rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def worker(which: str, a, out: Path) -> None:
    import torch

    from fastchat_ft.engine.distill_loss import Head, distill_loss, distill_loss_reference

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(a.tokens, a.student_hidden, generator=g).requires_grad_()
    ws = (torch.randn(a.vocab, a.student_hidden, generator=g) * 0.05).requires_grad_()
    xt = torch.randn(a.tokens, a.teacher_hidden, generator=g)
    wt = torch.randn(a.vocab, a.teacher_hidden, generator=g) * 0.05
    labels = torch.randint(0, a.vocab, (a.tokens,), generator=g)
    labels[torch.rand(a.tokens, generator=g) < 0.3] = -100
    kw = dict(kind="forward_kl", temperature=2.0, alpha=0.5)
    base = _rss_kib()
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        if which == "ours":
            r = distill_loss(xs, Head(ws), xt, Head(wt), labels, chunk_size=a.chunk, **kw)
        else:
            r = distill_loss_reference(xs, Head(ws), xt, Head(wt), labels, **kw)
        gx, gw = torch.autograd.grad(r.loss, (xs, ws))
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    torch.save({"loss": r.loss.detach(), "gx": gx, "gw": gw}, out / f"{which}.pt")
    (out / f"{which}.json").write_text(json.dumps({"seconds": sorted(times)[len(times) // 2],
                                                   "peak_mib": (peak - base) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=49152)        # SmolLM2's
    p.add_argument("--student-hidden", type=int, default=576)  # SmolLM2-135M
    p.add_argument("--teacher-hidden", type=int, default=960)  # SmolLM2-360M
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker")
    p.add_argument("--out")
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a, Path(a.out))
    import torch

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("ours", "reference"):
            cmd = [sys.executable, __file__, "--worker", which, "--out", tmp] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("worker", "out")]
            subprocess.run(cmd, check=True)
            res[which] = json.loads((Path(tmp) / f"{which}.json").read_text())
        ours, ref = torch.load(Path(tmp) / "ours.pt"), torch.load(Path(tmp) / "reference.pt")
    diff = {k: float((ours[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)) for k in ours}
    cpu = cpu_name()
    sizes = {k: getattr(a, k) for k in ("tokens", "vocab", "student_hidden", "teacher_hidden", "chunk", "threads")}
    print(f"machine: {cpu}, {os.cpu_count()} cores, {a.threads} threads; torch {torch.__version__}")
    print(f"sizes: {sizes} (fp32, forward KL, T=2, ~30% labels ignored)")
    print(f"{'':>10} {'fwd+bwd s':>10} {'peak MiB':>10}")
    for k in ("ours", "reference"):
        print(f"{k:>10} {res[k]['seconds']:>10.3f} {res[k]['peak_mib']:>10.0f}")
    print(f"ours/reference: time {res['ours']['seconds'] / res['reference']['seconds']:.2f}x, "
          f"peak memory {res['ours']['peak_mib'] / res['reference']['peak_mib']:.3f}x")
    print(f"max relative difference (loss, d hidden, d head): {diff['loss']:.2e}, {diff['gx']:.2e}, {diff['gw']:.2e}")
    out = ROOT / "bench" / "results" / "distill_loss.json"
    out.write_text(json.dumps({"machine": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "sizes": sizes,
                               "results": res, "max_relative_difference": diff}, indent=2))
    if max(diff.values()) > 1e-4:
        raise SystemExit("chunked and reference disagree")


if __name__ == "__main__":
    main()
