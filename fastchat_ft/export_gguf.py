"""`export --gguf q8_0|f16`: a GGUF file for llama.cpp / Ollama, written with the `gguf` package, for
llama-architecture models (Llama, SmolLM, Mistral-style) with a byte-level BPE tokenizer.

The layout follows llama.cpp's conventions (tensor names from gguf's TensorNameMap; Q and K rows permuted
to llama.cpp's rotary layout, which transformers' GGUF loader undoes; the end-of-turn token as eos/eot so
llama.cpp stops at the end of a reply). Hand-written because the only converter (llama.cpp's script) is not
a Python package and needs the llama.cpp source tree.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fastchat_ft.errors import ModelError
from fastchat_ft.inference import end_of_turn_token

LLAMA_LIKE = {"LlamaForCausalLM", "MistralForCausalLM"}
QK_ALIGN = 32  # Q8_0 blocks are 32 values along a row; rows of other lengths stay F16

# llama.cpp's pre-tokenizer names for the split rules it knows; "default" when nothing matches.
_PRE_TOKENIZER_BY_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def write_gguf(model, tokenizer, path: Path, qtype: str) -> Path:
    import gguf
    import numpy as np

    arch = (model.config.architectures or [type(model).__name__])[0]
    if arch not in LLAMA_LIKE:
        raise ModelError(f"GGUF export supports llama-architecture models; this one is {arch}",
                         field="--gguf", fix="export the merged model and convert it with llama.cpp's convert_hf_to_gguf.py")
    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    if tok_json["model"]["type"] != "BPE" or tok_json["model"].get("byte_fallback") or not _is_byte_level(tok_json):
        raise ModelError("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama-3, SmolLM style); this "
                         "tokenizer is SentencePiece-like", field="--gguf",
                         fix="convert the merged model with llama.cpp's convert_hf_to_gguf.py")
    cfg = model.config
    file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16}[qtype]
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(path.stem)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(cfg)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_file_type(file_type)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    writer.add_vocab_size(vocab_rows)
    _add_tokenizer(writer, tokenizer, tok_json, vocab_rows)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"no GGUF name for tensor {hf_name}", field="--gguf")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _rotary_permute(data, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _rotary_permute(data, cfg.num_key_value_heads)
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
        elif qtype == "q8_0" and data.shape[-1] % QK_ALIGN == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    print(f"wrote {path.name} ({path.stat().st_size / 1e6:.1f} MB, {qtype})")
    return path


def _rope_theta(cfg) -> float:
    scaling = getattr(cfg, "rope_scaling", None) or {}
    params = getattr(cfg, "rope_parameters", None) or {}
    kind = scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or "default"
    if kind != "default":
        raise ModelError(f"GGUF export does not write rope scaling {kind!r}", field="--gguf",
                         fix="convert the merged model with llama.cpp's convert_hf_to_gguf.py")
    return getattr(cfg, "rope_theta", None) or params.get("rope_theta") or 10000.0


def _rotary_permute(w, n_heads: int):
    """HF keeps each head's rotary halves as [first half; second half]; llama.cpp interleaves them pairwise."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _is_byte_level(tok_json: dict) -> bool:
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _pre_tokenizer_name(tok_json: dict) -> str:
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    for part in pre.get("pretokenizers", []):
        regex = (part.get("pattern") or {}).get("Regex") if part.get("type") == "Split" else None
        if regex in _PRE_TOKENIZER_BY_REGEX:
            return _PRE_TOKENIZER_BY_REGEX[regex]
    return "default"


def _add_tokenizer(writer, tokenizer, tok_json: dict, vocab_rows: int) -> None:
    import gguf

    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_rows:
        raise ModelError(f"tokenizer has {len(vocab)} tokens but the embedding only {vocab_rows} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_rows)]
    types = [gguf.TokenType.UNUSED] * vocab_rows
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    for token, i in vocab.items():
        tokens[i] = token
        if token in added:
            types[i] = gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED
        else:
            types[i] = gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(eot_id)  # llama.cpp stops on eos/eot: the end of a reply, not of the document
    writer.add_eot_token_id(eot_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        writer.add_pad_token_id(pad)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
                             and probe != tokenizer("a", add_special_tokens=False)["input_ids"])
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
