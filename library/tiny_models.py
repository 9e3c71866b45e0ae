"""Tiny random SD1/SD2/SDXL models with the real block layouts, for tests and setup checks.

    python -m library.tiny_models --arch sdxl --out /tmp/tiny-sdxl            # diffusers folder
    python -m library.tiny_models --arch sd1 --out /tmp/tiny-sd1.safetensors --single_file
"""
from __future__ import annotations

import torch

from library.clip_tokenizer import bundled_clip_tokenizer
from library.model_util import StableDiffusionModel, arch_config, build_from_config


def tiny_config(arch: str) -> dict:
    """The real architecture config with every width shrunk; block types, layer counts per block,
    SDXL's attention-free first down block, two text encoders and text_time conditioning are kept."""
    cfg = arch_config(arch)
    te = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, projection_dim=32)
    cfg["text_encoder"].update(te)
    cfg["vae"].update(block_out_channels=[16, 32, 32, 32], norm_num_groups=8, layers_per_block=1, sample_size=64)
    u = cfg["unet"]
    u.update(norm_num_groups=8, sample_size=8)
    if arch == "sdxl":
        cfg["text_encoder_2"].update(te, hidden_size=64, intermediate_size=128, projection_dim=64)
        u.update(block_out_channels=[32, 64, 64], transformer_layers_per_block=[1, 2, 2], attention_head_dim=[2, 4, 4],
                 cross_attention_dim=32 + 64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8)
    else:
        u.update(block_out_channels=[32, 64, 64, 64], cross_attention_dim=32)
        u["attention_head_dim"] = [2, 4, 4, 4] if arch == "sd2" else 4
    return cfg


def build_tiny_model(arch: str, seed: int = 0, v_parameterization: bool = False) -> StableDiffusionModel:
    """A tiny randomly initialised model in memory, with working (real) CLIP tokenizers."""
    torch.manual_seed(seed)
    tokenizers = [bundled_clip_tokenizer()]
    if arch == "sdxl":
        tokenizers.append(bundled_clip_tokenizer(pad_token="!"))
    model = build_from_config(tiny_config(arch), tokenizers, v_parameterization=v_parameterization)
    for m in [model.unet, model.vae, *model.text_encoders]:
        m.eval().requires_grad_(False)
    return model
