"""The system prompt a model's own chat template adds to a conversation that has none (SmolLM2: "You are a
helpful AI assistant named SmolLM, ..."). Training renders with a built-in template, but generate, serve, HF and
vLLM prompt the trained model through its own template; when that template adds a default system turn, training
must render it too, or the model is fine-tuned on prompts it will never see. Found by rendering a probe
conversation with the model's template and accepting a system turn only when the built-in template, given that
system prompt, produces exactly the same token ids."""
from __future__ import annotations

import functools
import re
from pathlib import Path

# the system turn of each built-in template that can carry one, as the model's own template would write it
SYSTEM_TURN = {
    "chatml": re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", re.S),
    "llama3": re.compile(r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S),
}
PROBE = [{"role": "user", "content": "Hello, who are you?"}, {"role": "assistant", "content": "An assistant."}]


@functools.lru_cache(maxsize=16)
def model_default_system(tokenizer_dir: str, template: str) -> str | None:
    """The default system prompt of the model's own chat template in `tokenizer_dir`, if `template` (a built-in)
    renders the probe identically with it; None when the model's template adds none, is absent, or renders the
    conversation differently from `template` (then there is no default to follow)."""
    pattern = SYSTEM_TURN.get(template)
    if pattern is None:
        return None
    from transformers import AutoTokenizer

    from fastchat_ft.data.encode import encode_chat

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if not getattr(tok, "chat_template", None):
            return None
        text = tok.apply_chat_template(PROBE, tokenize=False)
    except Exception:  # a template that cannot render the probe has no default this code could follow
        return None
    found = pattern.search(text, 0, max(0, text.find(PROBE[0]["content"])))
    if found is None:
        return None
    system = found.group(1)
    ids, _ = encode_chat(PROBE, str(Path(tokenizer_dir)), template, system_prompt=system)
    same = [int(i) for i in ids] == list(tok(text, add_special_tokens=False)["input_ids"])
    return system if same else None
