"""Load any local HF causal-LM folder for training, safely: no remote code unless asked, safetensors
when present (transformers loads any pickle with weights_only=True), and the chat template's control
tokens added (embeddings resized, new rows trainable) when the tokenizer lacks them.
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import torch

from fastchat_ft.errors import ModelError

# control tokens each built-in template writes; a tokenizer without them would split them into pieces
TEMPLATE_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}


def resolve_base_model(base_model: str | None) -> Path:
    """base_model from the config, or the default SmolLM2 (converted on first use)."""
    if not base_model:
        from fastchat_ft.model.default_model import default_model_dir
        return default_model_dir()
    path = Path(base_model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError("not a HF model folder (no config.json)", file=str(path), field="base_model",
                         fix="point base_model at a local folder saved with save_pretrained (hub downloads are not done here)")
    return path.resolve()


# a folder holding none of these has no tokenizer for transformers to load
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_hf_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError("the model folder has no tokenizer (" + ", ".join(TOKENIZER_FILES) + ")", file=str(folder),
                         field="base_model", fix="copy the model's tokenizer files into this folder "
                         "(tokenizer.save_pretrained(folder)) or point base_model at the full model folder")
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as e:  # transformers' message is long and names no file: keep it as the reason
        raise ModelError(f"transformers could not load the tokenizer: {str(e).splitlines()[0]}", file=str(folder),
                         field="base_model", fix="check that tokenizer.json / tokenizer_config.json are complete and "
                         "readable (set trust_remote_code: true only for a folder you trust)") from e
    if tok.pad_token is None:  # only used to pad generation prompts; training rows are packed, not padded
        tok.pad_token = tok.eos_token
    return tok


def load_model(folder: Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               quantization_config=None, attn_implementation: str = "sdpa"):
    from transformers import AutoConfig, AutoModelForCausalLM

    safetensors = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if getattr(config, "quantization_config", None) is not None and quantization_config is None:
            raise ModelError("this folder still carries a quantization_config (e.g. a GGUF or GPTQ export)",
                             file=str(folder / "config.json"),
                             fix="train from full-precision weights, or remove quantization_config after dequantising")
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=safetensors or None,
            quantization_config=quantization_config, attn_implementation=attn_implementation,
            # bitsandbytes quantises while loading onto the GPU
            device_map={"": torch.cuda.current_device()} if quantization_config is not None else None)
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused an object in a pickle weights file
        raise ModelError("a pickle weights file in this folder holds more than tensors (it could run code on load); "
                         f"refused: {str(e).splitlines()[0]}", file=str(folder),
                         fix="use a folder with .safetensors weights (convert it where you trust its origin)") from None
    except ValueError as e:
        msg = str(e)
        if "trust_remote_code" in msg:
            raise ModelError("this model needs its own Python code (trust_remote_code)", file=str(folder),
                             field="trust_remote_code", fix="set trust_remote_code: true only if you trust this folder") from None
        if "Unrecognized configuration class" in msg or "does not recognize" in msg:
            raise ModelError("not a causal language model transformers knows", file=str(folder),
                             fix="use a decoder-only chat model folder (Llama, Mistral, Qwen, Gemma, SmolLM, ...)") from None
        raise
    return model


def extend_tokenizer(tokenizer, template: str, base_dir: Path, save_dir: Path) -> tuple[Path, list[int]]:
    """Add the template's control tokens when the tokenizer lacks them. Returns the tokenizer folder the
    data pipeline must use (the base folder, or save_dir holding the extended tokenizer) and the new ids."""
    needed = [t for t in TEMPLATE_TOKENS.get(template, []) if t not in tokenizer.get_vocab()]
    if not needed:
        return base_dir, []
    tokenizer.add_special_tokens({"additional_special_tokens": needed})
    if template == "chatml" and tokenizer.eos_token != "<|im_end|>":
        tokenizer.eos_token = "<|im_end|>"  # generation must stop at the end of the assistant turn
    save_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(save_dir)
    if (base_dir / "chat_template.jinja").is_file() and not (save_dir / "chat_template.jinja").is_file():
        shutil.copy2(base_dir / "chat_template.jinja", save_dir / "chat_template.jinja")
    return save_dir, [tokenizer.convert_tokens_to_ids(t) for t in needed]


def resize_for_tokenizer(model, tokenizer) -> None:
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        # new rows start at the mean embedding: a random row would make the first steps' loss spike
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def train_new_rows_only(model, new_ids: list[int]) -> dict[str, torch.nn.Module]:
    """Make the embedding (and an untied lm_head) trainable for the added token rows only: a gradient
    hook zeroes every other row, and these modules are saved whole in the adapter (modules_to_save)."""
    if not new_ids:
        return {}
    rows = torch.tensor(new_ids)
    modules = {}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    for module in (emb, head):
        if module is None or any(module is m for m in modules.values()):
            continue
        if module is head and head.weight is emb.weight:
            continue
        module.weight.requires_grad_(True)
        mask = torch.zeros(module.weight.shape[0], 1, dtype=module.weight.dtype, device=module.weight.device)
        mask[rows.to(mask.device)] = 1
        module.weight.register_hook(lambda g, m=mask: g * m)
        name = next(n for n, m in model.named_modules() if m is module)
        modules[name] = module
    return modules


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
