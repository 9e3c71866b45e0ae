"""Tiny random SD1/SD2/SDXL models with the real block layouts, for tests and setup checks.

    python -m library.tiny_models --arch sdxl --out /tmp/tiny-sdxl            # diffusers folder
    python -m library.tiny_models --arch sd1 --out /tmp/tiny-sd1.safetensors --single_file

The files load through `library.model_util.load_model` like real ones (a single file keeps its tiny sizes in
the safetensors header), so the whole trainer can be exercised on CPU in seconds.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from library.clip_tokenizer import bundled_clip_tokenizer
from library.model_util import (
    ARCHS,
    StableDiffusionModel,
    PAD_TOKENS,
    arch_config,
    build_from_config,
    save_diffusers,
    save_single_file,
)


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
    tokenizers = [bundled_clip_tokenizer(pad_token=pad) for pad in PAD_TOKENS[arch]]
    model = build_from_config(tiny_config(arch), tokenizers, v_parameterization=v_parameterization)
    for m in [model.unet, model.vae, *model.text_encoders]:
        m.eval().requires_grad_(False)
    return model


def write_tiny_model(arch: str, out, single_file: bool = False, seed: int = 0, v_parameterization: bool = False,
                     overwrite: bool = False) -> str:
    """Build a tiny model and write it as a diffusers folder, or (`single_file`) an LDM/SGM .safetensors."""
    model = build_tiny_model(arch, seed=seed, v_parameterization=v_parameterization)
    if single_file:
        return save_single_file(model, out, overwrite=overwrite)
    return save_diffusers(model, out, overwrite=overwrite)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m library.tiny_models", description=__doc__.split("\n")[0])
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--out", required=True, help="a folder (diffusers layout), or a .safetensors file with --single_file")
    p.add_argument("--single_file", action="store_true", help="write one LDM/SGM .safetensors like A1111/ComfyUI use")
    p.add_argument("--v_parameterization", action="store_true", help="mark the model as v-prediction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    if args.single_file and not args.out.endswith(".safetensors"):
        p.error("--single_file needs an --out path ending in .safetensors")
    if not args.single_file and args.out.endswith(".safetensors"):
        p.error("--out ends in .safetensors: add --single_file, or give a folder for the diffusers layout")
    try:
        path = write_tiny_model(args.arch, args.out, single_file=args.single_file, seed=args.seed,
                                v_parameterization=args.v_parameterization, overwrite=args.overwrite)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind = "single-file .safetensors" if args.single_file else "diffusers folder"
    pred = "v-prediction" if args.v_parameterization else "epsilon"
    print(f"wrote tiny {args.arch} model ({kind}, {pred}, seed {args.seed}): {os.path.abspath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
