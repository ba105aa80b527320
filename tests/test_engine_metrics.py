"""fastchat_ft.engine.metrics: what the progress bar shows and what metrics.jsonl holds."""
import json

from fastchat_ft.engine.metrics import MetricsLogger


def test_progress_bar_keeps_training_metrics_through_an_evaluation(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=4)
    log.log({"step": 0, "val_loss": 2.9, "val_ppl": 18.2, "val_token_acc": 0.2})  # evaluation at step 0 comes first
    log.log({"step": 1, "loss": 2.5, "lr": 1e-4, "tokens_per_s": 321.0}, advance=1)
    log.log({"step": 1, "val_loss": 2.75, "val_ppl": 15.6, "val_token_acc": 0.3})
    postfix = log.bar.postfix
    assert postfix.index("loss=2.5") < postfix.index("val_loss"), postfix  # training metrics lead
    for shown in ("loss=2.5", "lr=0.0001", "tokens_per_s=321", "val_loss=2.75"):
        assert shown in postfix, postfix
    log.log({"step": 2, "loss": 2.25, "lr": 5e-5, "tokens_per_s": 300.0}, advance=1)
    assert "loss=2.25" in log.bar.postfix and "val_loss=2.75" in log.bar.postfix
    log.bar.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 1, 2] and rows[2]["val_loss"] == 2.75
