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


def test_a_resume_drops_the_samples_a_killed_run_wrote_past_its_checkpoint(tmp_path):
    # metrics.jsonl kept only the steps up to the checkpoint, samples.jsonl all of them: after a kill past the
    # checkpoint the resumed run wrote that evaluation's samples again (two step-4 groups here)
    metrics = [{"step": 0, "val_loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "val_loss": 2.5},
               {"step": 4, "loss": 1.5}, {"step": 4, "val_loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    samples = [{"step": s, "prompt": "hi", "output": f"out {s}", "reference": "r"} for s in (0, 2, 4)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    log = MetricsLogger(tmp_path, total_steps=6, start_step=3, show_bar=False)
    log.bar.close()
    assert [r["step"] for r in log.records] == [0, 2, 2]
    kept = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert kept == samples[:2]
