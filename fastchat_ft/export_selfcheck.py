"""The export self-check: reload what export wrote, the way a user would, and prove it is deployable.

Checks (each failure is an error, not a warning): the chat template round-trips (same text, same ids);
the stop tokens in generation_config include the end-of-turn token; the reloaded model gives the logits the
in-memory model gave; greedy generation on a few prompts ends with a stop token within the limit, using only
what the folder says (generation_config), as vLLM or transformers would; a GGUF copy gives close logits.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastchat_ft.errors import ModelError
from fastchat_ft.inference import ChatStream, chat_prompt_ids, end_of_turn_token, load_model, stop_token_ids

DEFAULT_PROMPTS = [
    {"messages": [{"role": "user", "content": "Hello! Who are you?"}], "reference": ""},
    {"messages": [{"role": "user", "content": "Give me three tips for staying focused."}], "reference": ""},
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "reference": ""},
]
# Relative logit error allowed after a save/reload: float32 is exact up to summation order; 16-bit
# storage rounds every weight (bf16 has 8 mantissa bits), so only closeness is meaningful there.
RELOAD_TOL = {"float32": 1e-4, "bfloat16": 0.08, "float16": 0.02}
GGUF_MIN_COSINE = 0.99


def self_check(folder: Path, mode: str, loaded, prompts: list[dict] | None = None, *,
               max_new_tokens: int | None = None, n_prompts: int = 3) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = (prompts or DEFAULT_PROMPTS)[:n_prompts]
    report: dict = {"passed": False, "prompts": []}
    problems: list[str] = []
    print("self-check: reloading the exported folder with transformers")

    tok = AutoTokenizer.from_pretrained(folder)
    src_tok = loaded.tokenizer
    conv = prompts[0]["messages"] + [{"role": "assistant", "content": prompts[0].get("reference") or "Sure."}]
    same_template = tok.chat_template == src_tok.chat_template
    text_out, text_src = (t.apply_chat_template(conv, tokenize=False) for t in (tok, src_tok))
    ids_out = tok(text_out, add_special_tokens=False)["input_ids"]
    ids_src = src_tok(text_src, add_special_tokens=False)["input_ids"]
    report["template_roundtrip"] = same_template and text_out == text_src and ids_out == ids_src
    if not report["template_roundtrip"]:
        problems.append("the chat template does not round-trip (rendered text or token ids differ after reload)")
    _line("chat template round-trips", report["template_roundtrip"])

    eot = end_of_turn_token(tok)
    eot_id = tok.convert_tokens_to_ids(eot)
    if mode == "merge":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        conf = json.loads((folder / "config.json").read_text())
        saved_dtype = str(conf.get("dtype") or conf.get("torch_dtype") or "float32")
    else:
        from transformers import GenerationConfig
        model = load_model(folder, device="cpu").model
        model.generation_config = GenerationConfig.from_pretrained(folder)  # the adapter's own stop tokens
        saved_dtype = "float32"
    gen_eos = model.generation_config.eos_token_id
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    report["end_of_turn"] = {"token": eot, "id": eot_id, "generation_config_eos": gen_eos}
    if eot_id not in gen_eos:
        problems.append(f"generation_config.json eos_token_id {gen_eos} does not include the end-of-turn token "
                        f"{eot} ({eot_id}): vLLM and transformers would not stop")
    _line(f"generation_config eos {gen_eos} includes end-of-turn {eot} ({eot_id})", eot_id in gen_eos)

    ids = torch.tensor([ids_src])
    with torch.no_grad():
        ref = loaded.model(ids.to(next(loaded.model.parameters()).device)).logits.float().cpu()
        got = model(ids).logits.float()
    rel = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
    tol = RELOAD_TOL.get(saved_dtype, 0.08)
    report["reload_logits"] = {"max_rel_diff": rel, "tolerance": tol, "dtype": saved_dtype,
                               "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
    if rel > tol:
        problems.append(f"reloaded logits differ from the exported model's (max relative diff {rel:.2e} > {tol})")
    _line(f"reloaded logits match (max relative diff {rel:.2e}, {saved_dtype}, tolerance {tol})", rel <= tol)

    limit = max_new_tokens or _default_limit(tok, prompts)
    stop_ids = gen_eos or stop_token_ids(tok, model)
    for p in prompts:
        stream = ChatStream(model, tok, p["messages"], max_new_tokens=limit, stop_ids=stop_ids)
        stream.run()
        entry = {"prompt": p["messages"][-1]["content"], "reply": stream.text, "tokens": len(stream.token_ids),
                 "stopped": stream.finish_reason == "stop"}
        report["prompts"].append(entry)
        _line(f"stops within {limit} tokens ({entry['tokens']} generated): {entry['prompt'][:50]!r}", entry["stopped"])
        if not entry["stopped"]:
            problems.append(f"generation did not stop within {limit} tokens for prompt {entry['prompt'][:60]!r} "
                            f"(no end-of-turn token {eot}); the model was not trained to end its turns")
    if mode == "merge":
        _check_generate_api(model, tok, prompts[0]["messages"], limit, gen_eos, report, problems)

    for gguf_file in sorted(folder.glob("*.gguf")):
        _check_gguf(folder, gguf_file, ids, ref, report, problems)

    report["passed"] = not problems
    report["problems"] = problems
    if problems:
        never_stops = any("did not stop" in p for p in problems)
        raise ModelError("export self-check failed:\n  - " + "\n  - ".join(problems), file=str(folder),
                         fix="a model that never stops needs its end-of-turn token trained (train on the assistant "
                             "turns including the end-of-turn token); see the [FAIL] lines above" if never_stops
                         else "see the [FAIL] lines above")
    print("self-check: passed")
    return report


def _check_generate_api(model, tok, messages, limit, gen_eos, report, problems) -> None:
    """The same stop, through transformers' own generate() reading only generation_config.json."""
    import torch

    prompt = torch.tensor([chat_prompt_ids(tok, messages)])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=limit, do_sample=False)
    new = out[0, prompt.shape[1]:].tolist()
    stopped = bool(new) and new[-1] in gen_eos and len(new) <= limit
    report["hf_generate_stops"] = stopped
    _line(f"transformers generate() stops by generation_config alone ({len(new)} tokens)", stopped)
    if not stopped:
        problems.append("transformers generate() with the saved generation_config did not stop at an eos token")


def _check_gguf(folder: Path, gguf_file: Path, ids, ref, report, problems) -> None:
    """The GGUF file read back on its own, as llama.cpp reads it. It holds the merged model (also in an --adapter
    export), so it is loaded from a folder of its own: beside adapter_config.json transformers would load the
    adapter's base model and look for the GGUF there."""
    import os
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="fastchat-ft-gguf-check-") as alone:
        os.symlink(gguf_file.resolve(), Path(alone) / gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(ids).logits.float()
    cos = float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0))
    top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    report.setdefault("gguf", {})[gguf_file.name] = {"cosine": cos, "top1_agreement": top1}
    _line(f"{gguf_file.name} read back by transformers: logits cosine {cos:.5f}, top-1 agreement {top1:.0%}",
          cos >= GGUF_MIN_COSINE)
    if cos < GGUF_MIN_COSINE:
        problems.append(f"{gguf_file.name}: logits read back are not close to the model's (cosine {cos:.4f})")


def _default_limit(tok, prompts: list[dict]) -> int:
    """Twice the longest reference answer plus slack, at least 256 tokens (a chat model may answer an unseen
    prompt at length and still end its turn), at most 1024."""
    longest = max((len(tok(p.get("reference") or "", add_special_tokens=False)["input_ids"]) for p in prompts),
                  default=0)
    return int(min(1024, max(256, 2 * longest + 32)))


def _line(text: str, ok: bool) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {text}")
