"""Export and eval on a run directory written by the real engine (`fastchat-ft train` on a tiny random Llama
with the SmolLM2 tokenizer): the artifacts come from the run, the merged weights equal peft's reading of the
engine's checkpoint, and eval's loss equals the validation loss the engine logged at the end."""
import json

import pytest
import torch

from engine_fixtures import tiny_run_config
from fastchat_ft import cli


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine_run")
    cfg, model = tiny_run_config(tmp, 32, 6, sequence_len=256, micro_batch_size=4, gradient_accumulation_steps=1,
                                 num_epochs=1, learning_rate=1e-2, lora_r=8, lora_alpha=16, seed=1)
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTCHAT_FT_CACHE", str(tmp / "cache"))
    torch.set_num_threads(1)
    assert cli.main(["train", str(cfg), "--output-dir", str(tmp / "run")]) == 0
    mp.undo()
    return {"tmp": tmp, "run": tmp / "run", "base": model}


def test_export_of_an_engine_run(engine_run, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run, out = engine_run["run"], engine_run["tmp"] / "export"
    code = cli.main(["export", str(run), "--out", str(out), "--check-max-new-tokens", "24"])
    err = capsys.readouterr().err
    # a random tiny model rarely ends its turn: then export must fail loudly and keep the folder for inspection
    folder = out if code == 0 else out.with_name("export.failed")
    assert code == 0 or ("did not stop within 24 tokens" in err and not out.exists())
    tok = AutoTokenizer.from_pretrained(folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos
    for name in ("training_config.yaml", "run_manifest.json", "data/train.jsonl", "data/val.jsonl",
                 "training_logs/metrics.jsonl", "loss_curve.png", "dataset_info.json", "generation_notes.md"):
        assert (folder / name).is_file(), name
    info = json.loads((folder / "dataset_info.json").read_text())
    assert info["train"]["conversations"] == 32 and info["val"]["conversations"] == 6
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "val_loss" in m]
    assert f"{evals[0]['val_loss']:.4f} before training, {evals[-1]['val_loss']:.4f} after" in \
        (folder / "generation_notes.md").read_text()
    ids = torch.randint(0, len(tok), (2, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(engine_run["base"]),
                                        run / "final").eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, ref, atol=1e-4, rtol=1e-4)


def test_eval_equals_the_engines_final_validation_loss(engine_run, capsys):
    run = engine_run["run"]
    assert cli.main(["eval", "--model", str(run), "--data", str(run / "data" / "val.jsonl"), "--max-seq-len", "256",
                     "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x][-1]
    assert res["model"]["loss"] == pytest.approx(last["val_loss"], rel=1e-4)
    assert res["model"]["token_acc"] == pytest.approx(last["val_token_acc"], abs=1e-6)
