"""Model loading, LoRA/QLoRA, kernel patching (also the drop-in API for other tools)."""
