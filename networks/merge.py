"""--base_weights: kohya LoRA files merged into the base model's weights before training (sd-scripts' differential
training): the new LoRA learns what those LoRAs do not already give, and is meant to be used together with them.

W += multiplier · (alpha / rank) · up @ down for every module of the file, computed in float32 by the same
`LoRAModule.delta_weight` that describes a trained LoRA. APT's prior pass then sees the merged model as the base.
"""
from __future__ import annotations

import logging
import os

import torch

from networks.lora import (LoRAModule, LoRAWeightsError, _describe_file, _fits, _group_kohya_keys, _read_lora_file,
                           _text_encoder_targets, _unet_targets, file_alpha, sgm_module_names)

logger = logging.getLogger(__name__)


def merge_lora_file(model, path, multiplier: float = 1.0) -> int:
    """Merge one kohya LoRA .safetensors into `model` (in place, in the model's current dtype); returns the number of
    modules merged. A file for another base model, or not a plain kohya LoRA, is a `LoRAWeightsError` naming it."""
    path = os.fspath(path)
    sd = _read_lora_file(path, flag="--base_weights")
    modules, extra = _group_kohya_keys(sd)
    modules = sgm_module_names(modules, model, f"--base_weights {path}")
    if extra or not modules:
        raise LoRAWeightsError(f"--base_weights {path}: not a plain kohya LoRA (networks.lora)"
                               + (f": unexpected keys such as {', '.join(sorted(extra)[:3])}" if extra else "")
                               + f". {_describe_file(sd, modules)}")
    targets = {t.lora_name: t.module for t in _text_encoder_targets(model) + _unet_targets(model, conv=True)}
    foreign = sorted(set(modules) - set(targets))
    if foreign:
        raise LoRAWeightsError(f"--base_weights {path}: {len(foreign)} of its {len(modules)} LoRA modules do not exist "
                               f"in this model (e.g. {', '.join(foreign[:3])}). {_describe_file(sd, modules)} Merge "
                               "LoRAs made for this base model.")
    with torch.no_grad():
        for name, entry in sorted(modules.items()):
            down, up, module = entry["lora_down"], entry["lora_up"], targets[name]
            rank = int(down.shape[0])
            alpha = file_alpha(entry)
            lora = LoRAModule(name, module, multiplier, rank, alpha)
            for part, t in (("lora_down", down), ("lora_up", up)):
                p = getattr(lora, part).weight
                if not _fits(t, p.shape):
                    raise LoRAWeightsError(f"--base_weights {path}: {name}.{part}.weight is {list(t.shape)}, this "
                                           f"model needs {list(p.shape)}. {_describe_file(sd, modules)}")
                p.copy_(t.reshape(p.shape).float())
            w = module.weight
            w.add_(lora.delta_weight().reshape(w.shape).to(w.device, w.dtype))
    return len(modules)


def merge_base_weights(model, paths, multipliers=None) -> list[str]:
    """--base_weights FILE ... with --base_weights_multiplier M ... (1.0 for a file without one, as in sd-scripts).
    Returns a line per file to print."""
    paths, multipliers = list(paths or []), list(multipliers or [])
    if multipliers and not paths:
        raise LoRAWeightsError("--base_weights_multiplier is the weight of each --base_weights file: add the files")
    if len(multipliers) > len(paths):
        raise LoRAWeightsError(f"--base_weights_multiplier has {len(multipliers)} values for {len(paths)} "
                               "--base_weights files: give one per file (1.0 for files left out at the end)")
    lines = []
    for i, path in enumerate(paths):
        m = multipliers[i] if i < len(multipliers) else 1.0
        n = merge_lora_file(model, path, m)
        lines.append(f"--base_weights: merged {path} ({n} modules, multiplier {m:g}) into the base model")
    return lines
