"""4-bit quantization: bitsandbytes layers for QLoRA, a plain-PyTorch NF4 reference, and the footprint report."""
