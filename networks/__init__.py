"""kohya-compatible LoRA networks."""
