"""The Hugging Face bridge: per-family names, config mapping, safetensors tensors, export, import and PEFT adapters."""
