"""Load SD1.x / SD2.x / SDXL models: diffusers folders and single-file checkpoints, fully offline.

Everything the trainer needs from a base model is gathered in one `StableDiffusionModel`.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ARCHS = ("sd1", "sd2", "sdxl")
_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


class ModelLoadError(Exception):
    """A user-facing model loading error; the message names the file or flag and what to do."""


@dataclass
class StableDiffusionModel:
    """A base model as the trainer sees it. `text_encoders`/`tokenizers` have 1 entry (SD) or 2 (SDXL)."""

    arch: str  # "sd1" | "sd2" | "sdxl"
    v_parameterization: bool
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list
    tokenizers: list
    noise_scheduler: DDPMScheduler
    source: str = ""  # path it was loaded from ("" for in-memory models)
    configs: dict = field(default_factory=dict)  # the architecture config dict it was built from

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)


def arch_config(arch: str) -> dict:
    """The real architecture's configs (see library/configs/README.md); a deep copy the caller may edit."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")
    with open(os.path.join(_CONFIG_DIR, f"{arch}.json"), encoding="utf-8") as f:
        return copy.deepcopy(json.load(f))


def make_noise_scheduler(v_parameterization: bool) -> DDPMScheduler:
    """The SD training schedule (sd-scripts: scaled_linear 0.00085..0.012, 1000 steps, no clipping)."""
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
    )


def _text_config(cfg: dict) -> CLIPTextConfig:
    cfg = {k: v for k, v in cfg.items() if k != "architectures"}
    return CLIPTextConfig(**cfg)


def build_from_config(configs: dict, tokenizers: list, v_parameterization: bool = False) -> StableDiffusionModel:
    """Instantiate randomly initialised modules from an architecture config dict (weights loaded later).

    Call under `torch.device("meta")` to get a weightless model (used for key checks on full-size models).
    """
    arch = configs["arch"]
    unet = UNet2DConditionModel.from_config({k: v for k, v in configs["unet"].items() if not k.startswith("_")})
    vae = AutoencoderKL.from_config({k: v for k, v in configs["vae"].items() if not k.startswith("_")})
    text_encoders = [CLIPTextModel(_text_config(configs["text_encoder"]))]
    if arch == "sdxl":
        text_encoders.append(CLIPTextModelWithProjection(_text_config(configs["text_encoder_2"])))
    return StableDiffusionModel(
        arch=arch,
        v_parameterization=v_parameterization,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=make_noise_scheduler(v_parameterization),
        configs=configs,
    )
