"""Metrics of the toy-world benchmark, read off the judge (analogues of the paper's Table 1).

Short, exact definitions; each works on plain tensors / judge predictions so it can be tested on hand-made
inputs:
- `attribute_accuracy`: fraction of the attributes a prompt names that the judge reads back (text alignment);
- `frechet_distance`: Fréchet distance between two feature sets (FID's formula, in the judge's feature space);
- `precision_recall`: k-NN precision and recall (Kynkäänniemi et al. 2019);
- `layout`: mean object size (small 0, medium 1, large 2) and the share of objects at the centre.
"""
from __future__ import annotations

from typing import Sequence

import torch

from bench.toyworld import world as W

NAMED = ("cls", "size", "colour", "position", "background")  # attributes a prompt can name (text alignment)


def named_attributes(prompt: str) -> dict:
    """The attributes `prompt` names explicitly (not the subject's implied colour or pattern)."""
    p = W.parse_prompt(prompt)
    return {k: p[k] for k in NAMED if k in p}


def attribute_accuracy(prompts: Sequence[str], pred: dict) -> tuple[float, dict]:
    """(fraction of named attributes found over all images, per-attribute fraction). `pred`: the judge's
    `predict` output for one image per prompt."""
    hits, total, per = 0, 0, {}
    for i, prompt in enumerate(prompts):
        for k, v in named_attributes(prompt).items():
            ok = pred[k][i] == v
            hits, total = hits + ok, total + 1
            a, b = per.get(k, (0, 0))
            per[k] = (a + ok, b + 1)
    return (hits / total if total else float("nan")), {k: a / b for k, (a, b) in per.items()}


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|μa − μb|² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½) for (N, D) feature sets (float64)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    ra = _sqrtm_psd(ca)
    cross = _sqrtm_psd(ra @ cb @ ra)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(ca) + torch.trace(cb) - 2 * torch.trace(cross))


def _radii(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Precision: share of `fake` inside some real sample's k-NN ball; recall: share of `real` inside some
    fake sample's k-NN ball."""
    real, fake = real.double(), fake.double()
    r_real, r_fake = _radii(real, k), _radii(fake, k)
    d = torch.cdist(fake, real)  # (F, R)
    precision = (d <= r_real[None, :]).any(1).double().mean()
    recall = (d.T <= r_fake[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def layout(pred: dict, idx: Sequence[int]) -> tuple[float, float]:
    """(mean size index, share at the centre) of the images `idx`."""
    idx = list(idx)
    if not idx:
        return float("nan"), float("nan")
    size = sum(W.SIZES.index(pred["size"][i]) for i in idx) / len(idx)
    centre = sum(pred["position"][i] == "center" for i in idx) / len(idx)
    return size, centre


def rate(values: Sequence, idx: Sequence[int], target=True) -> float:
    """Share of `values[i] == target` over `idx` (nan when empty)."""
    idx = list(idx)
    return sum(values[i] == target for i in idx) / len(idx) if idx else float("nan")
