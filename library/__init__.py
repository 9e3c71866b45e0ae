"""APT-LoRA support library: model loading, dataset config, datasets, training utilities."""
