"""sd-scripts' `--scale_weight_norms` (max-norm regularisation of each LoRA's ΔW), batched and on the device.

sd-scripts' `apply_max_norm_regularization` walks the state dict module by module and reads every ratio back to
the host; here the modules are stacked per weight shape (a handful of groups: SDXL's 722 UNet modules come in a
few dozen shapes), the norms and ratios are computed per group, and nothing is read back: the counts come back
as device tensors for the trainer to read when it logs.
"""
from __future__ import annotations

from collections import defaultdict

import torch


@torch.no_grad()
def max_norm_(loras, max_norm: float) -> dict[str, torch.Tensor]:
    """Rescale, in place, every LoRA whose ΔW = scale · up @ down has a Frobenius norm above `max_norm`: its up and
    down weights by √(max_norm / norm) each, so ΔW lands on the bound. As sd-scripts: the norm is floored at
    max_norm / 2 before the ratio (no division by 0 for an untrained LoRA, whose up is 0), and a conv LoRA's ΔW is
    up (out, r) @ down flattened to (r, in · kh · kw), the same matrix as sd-scripts' conv2d composition.

    Returns {"max_norm/keys_scaled", "max_norm/average_key_norm", "max_norm/max_key_norm"} as 0-d tensors (the
    norms after scaling, sd-scripts' log names)."""
    groups: dict[tuple, list] = defaultdict(list)
    for m in loras:
        groups[(tuple(m.lora_up.weight.shape), tuple(m.lora_down.weight.shape), m.scale)].append(m)
    scaled, norms = [], []
    for (_, _, scale), mods in groups.items():
        ups = [m.lora_up.weight for m in mods]
        downs = [m.lora_down.weight for m in mods]
        up = torch.stack([u.reshape(u.shape[0], -1) for u in ups]).float()  # (G, out, r)
        down = torch.stack([d.reshape(d.shape[0], -1) for d in downs]).float()  # (G, r, in·kh·kw)
        norm = torch.linalg.matrix_norm(torch.bmm(up, down)) * scale  # (G,)
        ratio = (max_norm / norm.clamp(min=max_norm / 2)).clamp(max=1.0)
        root = ratio.sqrt().unbind()
        torch._foreach_mul_(ups + downs, list(root) * 2)
        scaled.append((ratio < 1).sum())
        norms.append(norm * ratio)
    norms = torch.cat(norms)
    return {"max_norm/keys_scaled": torch.stack(scaled).sum(), "max_norm/average_key_norm": norms.mean(),
            "max_norm/max_key_norm": norms.max()}
