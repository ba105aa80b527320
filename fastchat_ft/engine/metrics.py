"""What a run reports: the progress bar (loss, lr, non-padding tokens/s, ETA), metrics.jsonl,
samples.jsonl, TensorBoard events when tensorboard is installed, and the loss-curve PNG at the end.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from fastchat_ft.atomic import write_text_atomic


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, show_bar: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.records: list[dict] = []
        self._shown: dict = {}  # the progress bar's postfix: latest loss, lr, tokens/s, val_loss
        if start_step:  # resume: keep history up to the checkpoint, drop what a killed run logged past it
            self.records = _kept_up_to(self.path, start_step)
            _kept_up_to(self.run_dir / "samples.jsonl", start_step)  # else its evaluations' samples come twice
        else:
            self.path.write_text("")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not show_bar, file=sys.stderr)
        self.tb = _tensorboard(self.run_dir / "training_logs")

    def log(self, record: dict, advance: int = 0) -> None:
        # strict JSON has no NaN/inf: a skipped bad batch logs loss null (and skipped: true from the loop)
        record = {k: ((round(v, 6) if math.isfinite(v) else None) if isinstance(v, float) else v) for k, v in record.items()}
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])
        if advance:
            self.bar.update(advance)
        # merged into what the bar already shows: an evaluation record (val_loss only) must not blank the
        # training loss, lr and tokens/s until the next logged step
        keys = ("loss", "lr", "tokens_per_s", "val_loss")
        new = {k: record[k] for k in keys if record.get(k) is not None}
        if new:
            self._shown.update(new)
            shown = {k: self._shown[k] for k in keys if k in self._shown}  # a fixed order, whatever logged first
            self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in shown.items()},
                                 refresh=False)

    def message(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr) if not self.bar.disable else print(text, file=sys.stderr)

    def close(self) -> Path | None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        return plot_loss_curve(self.records, self.run_dir / "loss_curve.png")


def _kept_up_to(path: Path, step: int) -> list[dict]:
    """The records of the .jsonl log `path` up to `step`, which it is rewritten (atomically) to hold."""
    if not path.is_file():
        return []
    kept = [rec for rec in map(json.loads, path.read_text().splitlines()) if rec.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return kept


def append_samples(run_dir: Path, step: int, samples: list[dict]) -> None:
    with (Path(run_dir) / "samples.jsonl").open("a") as f:
        for s in samples:
            f.write(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n")


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional (the `plots` extra)
        return None
    return SummaryWriter(log_dir=str(folder))


def plot_loss_curve(records: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / label token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
