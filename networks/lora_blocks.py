"""sd-scripts' block-wise LoRA settings (--network_args): a rank and alpha per UNet block (`block_dims`,
`block_alphas`, `conv_block_dims`, `conv_block_alphas`) and a learning-rate weight per block (`down_lr_weight`,
`mid_lr_weight`, `up_lr_weight`, `block_lr_zero_threshold`). Same block numbering, presets, padding and files as
sd-scripts' networks/lora.py, so a config carried over trains the same modules at the same rates.

Blocks (the "LoRA Block Weight" numbering):
- SD1.x/SD2.x, 25: 0 (no UNet LoRA), 1-11 down_blocks (3 a block: two layers and the downsampler), 12 mid_block,
  13-24 up_blocks (3 a block). down_lr_weight has 12 values (blocks 0-11), mid 1, up 12.
- SDXL, 23: 0 time/label embedding (no LoRA), 1-9 input_blocks 0-8, 10-12 middle_block 0-2, 13-21 output_blocks 0-8,
  22 out (no LoRA). down/up_lr_weight have 9 values, mid 3; blocks 0 and 22 keep weight 1.
A block whose lr weight is 0 gets no LoRA modules at all (as in sd-scripts).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)

BLOCK_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
              "mid_lr_weight", "up_lr_weight")
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


class BlockArgsError(ValueError):
    """A block-wise --network_args value that cannot be used; the message names the key and what it needs."""


def sizes(arch: str) -> tuple[int, int, int]:
    """(blocks in all, down/up lr weights, mid lr weights) for an architecture."""
    return (23, 9, 3) if arch == "sdxl" else (25, 12, 1)


def block_index(lora_name: str, arch: str) -> int:
    """The block of a UNet LoRA module name (sd-scripts `get_block_index`); -1 for a name outside the blocks."""
    if arch != "sdxl":
        m = _UPDOWN.search(lora_name)
        if m:
            i, kind, j = int(m[2]), m[3], int(m[4])
            idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
            return 1 + idx if m[1] == "down" else 13 + idx
        return 12 if "mid_block_" in lora_name else -1
    if not lora_name.startswith("lora_unet_"):
        return -1
    name = lora_name[len("lora_unet_"):]
    for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(prefix):
            return first + int(name.split("_")[2])
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    return 22 if name.startswith("out_") else -1


@dataclass
class BlockPlan:
    """Per-block ranks and alphas (None for conv: no 3x3-conv LoRA) and lr weights (None: one UNet group)."""
    dims: list
    alphas: list
    conv_dims: Optional[list]
    conv_alphas: Optional[list]
    lr_weight: Optional[list]

    def rank_alpha(self, lora_name: str, arch: str, conv3x3: bool) -> tuple[int, float]:
        """(rank, alpha) of a UNet module; rank 0 means no module."""
        i = block_index(lora_name, arch)
        if i < 0:
            raise BlockArgsError(f"{lora_name}: not in any UNet block of the block-wise --network_args")
        if conv3x3:
            return (0, 0.0) if self.conv_dims is None else (self.conv_dims[i], self.conv_alphas[i])
        return self.dims[i], self.alphas[i]


def _numbers(key: str, value, cast, n: Optional[int] = None) -> list:
    try:
        out = [cast(float(s)) if cast is int else float(s) for s in str(value).split(",")]
        if cast is int and any(float(s) != int(float(s)) for s in str(value).split(",")):
            raise ValueError
    except ValueError:
        raise BlockArgsError(f"--network_args {key}={value!r}: expected comma-separated "
                             f"{'integers' if cast is int else 'numbers'}") from None
    if n is not None and len(out) != n:
        raise BlockArgsError(f"--network_args {key} needs {n} values for this model (one per UNet block), got "
                             f"{len(out)}; docs/lora_format.md lists the blocks")
    return out


def _lr_list(key: str, value, n: int) -> list:
    """A preset ("cosine", "sine", "linear", "reverse_linear", "zeros", each with an optional "+base") or a comma
    list; empty entries are 0; padded with 1.0 / cut to `n` (sd-scripts warns and does the same)."""
    text = str(value)
    name, _, base = text.partition("+")
    if name in PRESETS and key == "mid_lr_weight":  # sd-scripts: a number (SD1/SD2's one mid block) or a list
        raise BlockArgsError(f"--network_args {key}={text!r}: the presets are for down_lr_weight and up_lr_weight; "
                             "give the middle block's weight as a number (SDXL: up to 3, comma-separated)")
    if name in PRESETS:
        try:
            b = float(base) if base else 0.0
        except ValueError:
            raise BlockArgsError(f"--network_args {key}={text!r}: the part after + must be a number") from None
        ramp = [i / (n - 1) for i in range(n)]
        curve = {"cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
                 "sine": [math.sin(math.pi * r / 2) for r in ramp],
                 "linear": ramp, "reverse_linear": list(reversed(ramp)), "zeros": [0.0] * n}[name]
        return [c + b for c in curve]
    if "," not in text and key != "mid_lr_weight":
        raise BlockArgsError(f"--network_args {key}={text!r}: give comma-separated weights or one of "
                             f"{', '.join(PRESETS)} (optionally +base, e.g. cosine+0.5)")
    try:
        weights = [float(s) if s.strip() else 0.0 for s in text.split(",")]
    except ValueError:
        raise BlockArgsError(f"--network_args {key}={text!r}: expected comma-separated numbers") from None
    if len(weights) != n:
        logger.warning("--network_args %s has %d values, this model has %d blocks there: %s", key, len(weights), n,
                       "the rest are cut off" if len(weights) > n else "the missing ones are 1.0")
    return (weights + [1.0] * n)[:n]


def parse_block_args(kw: dict, arch: str, dim: int, alpha: float, conv_dim: Optional[int],
                     conv_alpha: Optional[float]) -> Optional[BlockPlan]:
    """The block plan of --network_args `kw` (raw string values), or None when no block key is given."""
    total, n_side, n_mid = sizes(arch)
    lr_weight = None
    if any(kw.get(k) is not None for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
        threshold = float(kw.get("block_lr_zero_threshold") or 0.0)
        parts = []
        for key, n in (("down_lr_weight", n_side), ("mid_lr_weight", n_mid), ("up_lr_weight", n_side)):
            w = [1.0] * n if kw.get(key) is None else _lr_list(key, kw[key], n)
            parts.append([x if x > threshold else 0.0 for x in w] if kw.get(key) is not None else w)
        lr_weight = parts[0] + parts[1] + parts[2]
        if arch == "sdxl":
            lr_weight = [1.0] + lr_weight + [1.0]
    elif kw.get("block_lr_zero_threshold") is not None:
        raise BlockArgsError("--network_args block_lr_zero_threshold applies to down_lr_weight / mid_lr_weight / "
                             "up_lr_weight: give one of them")
    if kw.get("block_dims") is None and lr_weight is None:
        for key in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
            if kw.get(key) is not None:
                raise BlockArgsError(f"--network_args {key} is used with block_dims (or a block lr weight): add "
                                     "block_dims")
        return None
    dims = _numbers("block_dims", kw["block_dims"], int, total) if kw.get("block_dims") is not None else [dim] * total
    alphas = (_numbers("block_alphas", kw["block_alphas"], float, total) if kw.get("block_alphas") is not None
              else [alpha] * total)
    if kw.get("conv_block_dims") is not None:
        conv_dims = _numbers("conv_block_dims", kw["conv_block_dims"], int, total)
        conv_alphas = (_numbers("conv_block_alphas", kw["conv_block_alphas"], float, total)
                       if kw.get("conv_block_alphas") is not None else [1.0 if conv_alpha is None else conv_alpha] * total)
    elif conv_dim is not None:  # 0 too: the conv blocks' Linear/1x1 layers are targeted, no 3x3 (sd-scripts)
        conv_dims, conv_alphas = [conv_dim] * total, [conv_alpha] * total
    else:
        if kw.get("conv_block_alphas") is not None:
            raise BlockArgsError("--network_args conv_block_alphas needs conv_block_dims (or conv_dim)")
        conv_dims = conv_alphas = None
    if any(d < 0 for d in dims + (conv_dims or [])):
        raise BlockArgsError("--network_args block_dims / conv_block_dims must be >= 0 (0: no LoRA in that block)")
    if lr_weight is not None:  # a block that does not learn gets no modules
        for i, w in enumerate(lr_weight):
            if w == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return BlockPlan(dims, alphas, conv_dims, conv_alphas, lr_weight)
