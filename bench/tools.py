"""Dataset tools throughput and memory: `validate` (structure only, and with tokenizer + max_seq_len) and
`analyze` beside the loader (ChatDataset: parse, render, tokenize, label, pack) on the same generated file,
at two sizes, each run in its own process so peak RSS is that run's alone.

    python bench/tools.py                      # 1M and 250k conversations (files generated into /tmp)
    python bench/tools.py --sizes 100000 20000 # quicker
    python bench/tools.py --runs 'loader (ChatDataset)' --out bench/results/loader_memory.json  # loader memory

Writes bench/results/tools.json. The files are generated into /tmp and never committed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "smollm2"


def generate(path: Path, n: int, seed: int = 0) -> None:
    """n chat conversations: 1-2 exchanges, optional system prompt, user 4-24 words, assistant 20-69 words
    drawn Zipf-like from a 20k-word vocabulary; 1% exact copies and 1% one-word edits of earlier records."""
    if path.is_file() and path.stat().st_size > 0:
        return
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = ["".join(rng.choice(letters, size=int(k))) for k in rng.integers(2, 10, size=20000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    pool = rng.choice(len(vocab), size=4_000_000, p=weights)
    pos = 0
    systems = ["You are a helpful assistant.", "Answer briefly and precisely.", ""]
    tmp = path.with_suffix(".tmp")
    kept: list[str] = []
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            r = rng.random()
            if kept and r < 0.01:
                line = kept[int(rng.integers(len(kept)))]
            elif kept and r < 0.02:  # an earlier record with one word of its last answer changed
                rec = json.loads(kept[int(rng.integers(len(kept)))])
                words = rec["messages"][-1]["content"].split()
                words[int(rng.integers(len(words)))] = "edited"
                rec["messages"][-1]["content"] = " ".join(words)
                line = json.dumps(rec)
            else:
                msgs = []
                sys_prompt = systems[i % 3]
                if sys_prompt:
                    msgs.append({"role": "system", "content": sys_prompt})
                for _ in range(int(rng.integers(1, 3))):
                    for role, lo, hi in (("user", 4, 25), ("assistant", 20, 70)):
                        k = int(rng.integers(lo, hi))
                        if pos + k > pool.size:  # fresh words: a reused pool would repeat whole texts
                            pool = rng.choice(len(vocab), size=pool.size, p=weights)
                            pos = 0
                        words = [vocab[w] for w in pool[pos:pos + k]]
                        pos += k
                        msgs.append({"role": role, "content": " ".join(words).capitalize() + "."})
                line = json.dumps({"messages": msgs})
                if len(kept) < 10000:
                    kept.append(line)
            f.write(line + "\n")
    os.replace(tmp, path)


RUNNERS = {
    "validate": "from fastchat_ft.data.validate import validate_file as f; r = f(P, near_duplicates=True); "
                "out = {'records': r.records, 'errors': r.records_with_errors, 'exact': r.exact_duplicates, "
                "'near': r.near_duplicates}",
    "validate (exact only)": "from fastchat_ft.data.validate import validate_file as f; "
                             "r = f(P, near_duplicates=False); out = {'records': r.records, 'exact': r.exact_duplicates}",
    "validate+tokens": "from fastchat_ft.data.validate import validate_file as f; r = f(P, tokenizer=T, max_seq_len=2048); "
                       "out = {'records': r.records, 'errors': r.records_with_errors}",
    "analyze": "from fastchat_ft.data.analyze import analyze_file as f; r = f(P, T, max_seq_len=2048); "
               "out = {'records': r['records'], 'tokens': r['tokens']['total'], 'packed': r['packing']['packed_sequences']}",
    "loader (ChatDataset)": "from fastchat_ft.data import ChatDataset; d = ChatDataset(P, T, max_seq_len=2048, cache=False, "
                            "verbose=False, self_check=0); out = {'records': d.stats.records, 'tokens': d.stats.tokens, "
                            "'packed': d.stats.bins}",
}


def run_one(name: str, path: Path, tokenizer: Path) -> dict:
    code = (f"import json, time; P = {str(path)!r}; T = {str(tokenizer)!r}; t0 = time.perf_counter(); "
            f"{RUNNERS[name]}; out['seconds'] = time.perf_counter() - t0; print(json.dumps(out))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if status != 0:
        raise RuntimeError(f"{name} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 250_000])
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tools.json"))
    ap.add_argument("--skip-loader", action="store_true")
    ap.add_argument("--runs", nargs="+", choices=list(RUNNERS), metavar="RUN",
                    help="only these runs (e.g. --runs 'loader (ChatDataset)' for the loader's memory alone)")
    args = ap.parse_args()
    import fastchat_ft
    import tokenizers
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "fastchat_ft": fastchat_ft.__version__, "tokenizers": tokenizers.__version__,
               "tokenizer": Path(args.tokenizer).name}
    print(f"machine: {machine}")
    results = []
    for n in args.sizes:
        path = Path(args.tmp) / f"fastchat_tools_bench_{n}.jsonl"
        t0 = time.perf_counter()
        generate(path, n)
        size_mb = path.stat().st_size / 1e6
        print(f"\n{n} conversations, {size_mb:.0f} MB ({path}; generated/reused in {time.perf_counter() - t0:.0f} s)")
        print(f"  {'run':<22}{'seconds':>9}{'conv/s':>11}{'MB/s':>8}{'peak RSS MB':>13}  result")
        for name in RUNNERS:
            if (name.startswith("loader") and args.skip_loader) or (args.runs and name not in args.runs):
                continue
            r = run_one(name, path, Path(args.tokenizer))
            r.update(run=name, conversations=n, file_mb=size_mb, conv_per_s=n / r["seconds"],
                     mb_per_s=size_mb / r["seconds"])
            results.append(r)
            extra = {k: v for k, v in r.items() if k in ("records", "errors", "exact", "near", "tokens", "packed")}
            print(f"  {name:<22}{r['seconds']:>9.1f}{r['conv_per_s']:>11.0f}{r['mb_per_s']:>8.1f}"
                  f"{r['peak_rss_mb']:>13.0f}  {extra}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "results": results}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
