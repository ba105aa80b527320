"""`export --4bit`: a bitsandbytes nf4 (double-quantized) copy of the merged model that transformers loads for
memory-light deployment. Needs CUDA and bitsandbytes; without them it fails before anything is written.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from fastchat_ft.errors import FastchatError


def check_4bit_available() -> None:
    import torch

    if not torch.cuda.is_available():
        raise FastchatError("--4bit needs a CUDA GPU (bitsandbytes quantizes on the GPU)", field="--4bit",
                            fix="run export on a GPU machine, or drop --4bit (the merged model loads in 4-bit "
                                "later with BitsAndBytesConfig(load_in_4bit=True))")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FastchatError("--4bit needs the bitsandbytes package", field="--4bit",
                            fix="pip install 'fastchat-ft[qlora]'  (or: pip install bitsandbytes)") from None


def write_4bit(merged_dir: Path | None, loaded, out: Path) -> dict:
    """Quantize the merged float weights to nf4 with double quantization (bf16 compute) and save them."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fastchat_ft.export import save_tokenizer, write_merged

    check_4bit_available()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = merged_dir
        if src is None or not (src / "config.json").is_file():  # adapter export: merge to a temporary folder
            src = Path(tmp)
            write_merged(loaded, src, dtype=torch.bfloat16)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=quant, device_map={"": 0},
                                                     dtype=torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        save_tokenizer(loaded.tokenizer, out)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    conf = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    print(f"wrote nf4 copy: {size / 1e6:.1f} MB ({conf.get('bnb_4bit_quant_type')}, "
          f"double quant {conf.get('bnb_4bit_use_double_quant')})")
    return {"dir": out.name, "bytes": size}
