"""Builders shared by the eval/generate/export/serve tests: a tiny byte-level BPE tokenizer with a ChatML
template, a tiny random Llama saved with save_pretrained, and a run directory whose LoRA checkpoint is
written by `peft` itself (so the PEFT layout is the real one, not our idea of it). Nothing is downloaded.

The "stopper" model is random except for 32 constant residual channels that every layer leaves alone and
that the lm_head reads only into <|im_end|>: greedy decoding then ends every turn with <|im_end|>, deterministically,
which is what a trained chat model does and what the export self-check must confirm. The "chatty" model
uses the same channels to push <|im_end|> and eos far down, so it never stops (a broken export).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ("the cat sat on a mat while two dogs ran home quickly because weather was cold and "
         "bright stars shine over quiet hills every night answer question model token export").split()


def random_sentence(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(3, 12)))


def make_conversations(n: int, seed: int = 0, multi_turn_every: int = 3) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 2 == 0 else []
        for _ in range(2 if i % multi_turn_every == 0 else 1):
            msgs.append({"role": "user", "content": random_sentence(rng) + "?"})
            msgs.append({"role": "assistant", "content": random_sentence(rng) + "."})
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tokenizer(out_dir: Path, extra_special: list[str] | None = None):
    """Train a ~400-token byte-level BPE (GPT-2 style) and save it as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    corpus = [random_sentence(rng, 20) + " ?." for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": extra_special})
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def make_base_model(out_dir: Path, tokenizer, *, stopper: bool = True, seed: int = 0, vocab_size: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=96, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than HF's 0.02 init so logits differ clearly between tokens
            if p.dim() == 2:
                p.normal_(0, 0.1)
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if stopper:
            _steer(model, {im_end: 2.0})
        else:  # never emits a stop token, however long it runs
            _steer(model, {im_end: -2.0, tokenizer.eos_token_id: -2.0})
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


STEER = slice(0, 32)  # one whole Q8_0 block of channels, so quantizing the constant part stays exact


def _steer(model, token_bias: dict[int, float]) -> None:
    model.model.embed_tokens.weight[:, STEER] = 0.9  # constant residual channels...
    for layer in model.model.layers:  # ...that no layer reads or writes...
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                     layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[:, STEER] = 0.0
        layer.self_attn.o_proj.weight[STEER, :] = 0.0
        layer.mlp.down_proj.weight[STEER, :] = 0.0
    model.lm_head.weight[:, STEER] = 0.0  # ...and that only the steered tokens read: a fixed logit bias.
    for token_id, weight in token_bias.items():
        model.lm_head.weight[token_id, STEER] = weight


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora_checkpoint(ckpt_dir: Path, base_dir: Path, tokenizer, *, seed: int = 0,
                         new_tokens: list[str] | None = None, use_rslora: bool = False):
    """A LoRA checkpoint in PEFT layout written by peft. With new_tokens the vocabulary is resized and the
    embedding + lm_head are saved whole (modules_to_save style), as the engine does for added tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed + 100)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    extra = {}
    if new_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": new_tokens})
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            n = len(new_tokens)
            base.model.embed_tokens.weight[-n:].normal_(0, 0.2)
            base.lm_head.weight[-n:].normal_(0, 0.2)
            base.model.embed_tokens.weight[-n:, STEER] = 0.9
            base.lm_head.weight[-n:, STEER] = 0.0  # keep the steering property
        extra["modules_to_save"] = ["embed_tokens", "lm_head"]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, use_rslora=use_rslora,
                     task_type="CAUSAL_LM", **extra)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.normal_(0, 0.1)
                if "lora_B" in name and ("o_proj" in name or "down_proj" in name):
                    p[STEER, :] = 0.0  # the steering channels stay untouched by the adapter too
                if "lora_A" in name and not ("o_proj" in name or "down_proj" in name):
                    p[:, STEER] = 0.0
    peft_model.save_pretrained(ckpt_dir)
    tokenizer.save_pretrained(ckpt_dir)
    conf_path = ckpt_dir / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    conf["base_model_name_or_path"] = str(base_dir.resolve())
    conf_path.write_text(json.dumps(conf, indent=2))
    (ckpt_dir / "trainer_state.json").write_text(json.dumps({"step": 12, "epoch": 1.0}))
    return peft_model.eval()


def make_run_dir(root: Path, *, stopper: bool = True, new_tokens: list[str] | None = None, n_train: int = 24,
                 n_val: int = 8) -> dict:
    """A run directory in the engine's layout (runlayout.md) with a LoRA final/ and one older checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(root / "tok")
    base_dir = root / "base"
    make_base_model(base_dir, tok, stopper=stopper)
    run = root / "run"
    make_lora_checkpoint(run / "checkpoints" / "step-000006", base_dir, tok, seed=7)
    peft_model = make_lora_checkpoint(run / "final", base_dir, tok, new_tokens=new_tokens)
    train_rows, val_rows = make_conversations(n_train, seed=1), make_conversations(n_val, seed=2)
    write_jsonl(run / "data" / "train.jsonl", train_rows)
    write_jsonl(run / "data" / "val.jsonl", val_rows)
    (run / "training_config.yaml").write_text(
        f"base_model: {base_dir}\nadapter: lora\nlora_r: 4\nlora_alpha: 8\nlearning_rate: 0.0002\n"
        "num_epochs: 1\nmicro_batch_size: 2\ngradient_accumulation_steps: 2\nsequence_len: 256\n"
        f"output_dir: {run}\n")
    metrics = [{"step": 0, "loss": 6.1, "lr": 0.0, "tokens_per_s": 0.0, "val_loss": 6.0, "val_ppl": 403.4,
                "val_token_acc": 0.01}]
    metrics += [{"step": s, "loss": 6.0 - 0.3 * s, "lr": 2e-4, "tokens_per_s": 120.0} for s in range(1, 12)]
    metrics.append({"step": 12, "loss": 2.5, "lr": 1e-5, "tokens_per_s": 118.0, "val_loss": 2.9, "val_ppl": 18.2,
                    "val_token_acc": 0.41})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "run_manifest.json").write_text(json.dumps({"git_revision": "test", "device": "cpu"}))
    return {"root": root, "run": run, "base": base_dir, "tokenizer": tok, "peft_model": peft_model,
            "train": train_rows, "val": val_rows}


# Fixtures, imported by the test modules that need them (`from test_export_fixtures import tiny_run`).
import pytest  # noqa: E402

_BUILT: dict[str, dict] = {}


def _cached_run(tmp_path_factory, name: str, **kw) -> dict:
    """One build per test session even when several modules import the fixture."""
    if name not in _BUILT:
        _BUILT[name] = make_run_dir(tmp_path_factory.mktemp(name), **kw)
    return _BUILT[name]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run dir whose LoRA final/ makes a model that ends each reply with <|im_end|>."""
    torch.set_num_threads(1)
    return _cached_run(tmp_path_factory, "tiny_run")


@pytest.fixture(scope="session")
def tiny_run_new_tokens(tmp_path_factory):
    """Like tiny_run, but the vocabulary was resized for an added token (<|tool|>)."""
    torch.set_num_threads(1)
    return _cached_run(tmp_path_factory, "tiny_run_new_tokens", new_tokens=["<|tool|>"])


@pytest.fixture(scope="session")
def chatty_run(tmp_path_factory):
    """A run dir whose model never emits <|im_end|> (what a broken export looks like)."""
    torch.set_num_threads(1)
    return _cached_run(tmp_path_factory, "chatty_run", stopper=False)
