"""APT's losses (DESIGN.md §2.3–2.5, §2.7; paper Eqs. 3–7) and the DCO baseline loss.

Every function here is pure: tensors in, tensors out, no model. Statistics and losses are computed in
float32 whatever the training dtype, because the quantities compared (means of hidden states, attention
probabilities summed over heads, loss differences scaled by β = 1000) lose their meaning in bf16.
The prior's inputs are detached: the prior pass runs without grad, but a caller that forgets `no_grad`
must still not push gradients into the prior side.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

LAMBDA_DIST = 30.0
LAMBDA_ATTN = 3e-4
DCO_BETA = 1000.0


def adaptive_weights(gamma_per_sample: torch.Tensor, is_reg: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3: weight 1 − γ_bin(t_i) per sample; regularization samples keep 1 (they are not the subject,
    the indicator does not measure them). Float32, on γ's device."""
    w = 1.0 - gamma_per_sample.detach().float()
    if is_reg is not None:
        w = torch.where(is_reg.to(w.device).bool().reshape(w.shape), torch.ones_like(w), w)
    return w


class _MeanStd(torch.autograd.Function):
    """(μ, σ) over `dims` in float32 (float64 for float64 input), population std, with a hand-written backward
    that saves the input in its own dtype: a bf16 hidden state is not kept as a float32 copy for backward."""

    @staticmethod
    def forward(ctx, x, dims):
        acc = torch.promote_types(x.dtype, torch.float32)
        var, mu = torch.var_mean(x.to(acc), dim=dims, correction=0)
        sigma = var.sqrt()
        ctx.dims = dims
        ctx.save_for_backward(x, mu, sigma)
        return mu, sigma

    @staticmethod
    def backward(ctx, g_mu, g_sigma):
        x, mu, sigma = ctx.saved_tensors
        dims = ctx.dims
        n = math.prod(x.shape[d] for d in dims)
        for d in sorted(dims):
            mu, sigma, g_mu, g_sigma = mu.unsqueeze(d), sigma.unsqueeze(d), g_mu.unsqueeze(d), g_sigma.unsqueeze(d)
        # dμ/dx = 1/n ; dσ/dx = (x − μ) / (n σ)
        grad = (g_mu + g_sigma * (x.to(mu.dtype) - mu) / sigma.clamp_min(1e-12)) / n
        return grad.to(x.dtype), None


RS_STATS = ("scalar", "per_channel")


def hidden_stats(h: torch.Tensor, mode: str = "scalar") -> tuple[torch.Tensor, torch.Tensor]:
    """μ and σ of one hidden state per sample, in float32 (§2.4).

    `h`: (B, N, C) tokens × channels (attn1 output), or (B, C, H, W) (Transformer2DModel output).
    scalar: over all tokens and channels -> (B,), (B,). per_channel: over tokens, per channel -> (B, C).
    σ is the population standard deviation (correction 0): the statistic of the feature map itself,
    not an estimate of a larger population; over thousands of elements the difference is negligible.
    """
    if mode not in RS_STATS:
        raise ValueError(f"apt_rs_stats must be one of {RS_STATS}, got {mode!r}")
    if h.dim() not in (3, 4):
        raise ValueError(f"hidden_stats needs (B, N, C) or (B, C, H, W), got shape {tuple(h.shape)}")
    if mode == "scalar":
        dims = tuple(range(1, h.dim()))
    elif h.dim() == 3:  # (B, N, C): over tokens
        dims = (1,)
    else:  # (B, C, H, W): over pixels
        dims = (2, 3)
    return _MeanStd.apply(h, dims)


def _groups(keys: Sequence) -> list[list[int]]:
    """Indices grouped by equal key (a layer's shape), in first-seen order: each group is stacked and reduced at
    once, a handful of kernels for all its layers instead of ten per layer (a GPU step is bound by launches,
    docs/speed.md)."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return list(out.values())


def _sum_sq_diff(ft: Sequence[torch.Tensor], prior: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_layers of the per-sample mean of (ft − prior)², (B,) float32; the prior side detached."""
    total = None
    for g in _groups([tuple(t.shape) for t in ft]):
        a = torch.stack([ft[i] for i in g]).float()  # (L, B, ...)
        b = torch.stack([prior[i].detach() for i in g]).float().to(a.device)
        d = (a - b).pow(2)
        part = d.reshape(d.shape[0], d.shape[1], -1).mean(dim=2).sum(dim=0)
        total = part if total is None else total + part
    return total


def rs_losses(stats_ft: Sequence[tuple[torch.Tensor, torch.Tensor]],
              stats_prior: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 4, 5: L_μ = mean_i Σ_layers (μ_θ − μ_φ)², L_σ likewise.

    Each argument is a list over layers of (μ, σ) from `hidden_stats`. In per-channel mode ((B, C)
    statistics) the squared differences are averaged over channels, so the term stays on the scale of the
    scalar mode (it is ≥ the scalar term by Jensen, equal when all channels shift alike) and λ_dist = 30
    keeps its meaning; a sum would multiply the term by the width (320–1280) and weight wide layers more.
    """
    if len(stats_ft) != len(stats_prior):
        raise ValueError(f"{len(stats_ft)} fine-tuned layers but {len(stats_prior)} prior layers")
    if len(stats_ft) == 0:
        raise ValueError("rs_losses needs at least one layer")

    l_mu = _sum_sq_diff([mt for mt, _ in stats_ft], [mp for mp, _ in stats_prior])
    l_sigma = _sum_sq_diff([st for _, st in stats_ft], [sp for _, sp in stats_prior])
    return l_mu.mean(), l_sigma.mean()


def attn_loss(maps_ft: Sequence[torch.Tensor], maps_prior: Sequence[torch.Tensor], pi: torch.Tensor | None,
              num_heads: int | Sequence[int]) -> torch.Tensor:
    """Eq. 6: per layer D = A_θ − A_φ[..., π], L = (1/H)·||D||²_F; summed over layers, mean over the batch.

    `maps_*`: lists over layers of head-summed cross-attention probabilities (B, N_query, N_tokens).
    `pi`: LongTensor (B, N_tokens_ft) of column indices into the prior's token axis, one row per sample
    (captions differ); None means the identity (c == c*). A column with π = −1 (`prompts.DROPPED`, mode
    "drop": the identifier) is left out of the loss. `num_heads`: H, one int for all layers or one
    per layer (SDXL's up blocks have different head counts). Every token column counts, BOS/EOS/padding
    included (§2.5).
    """
    if len(maps_ft) != len(maps_prior):
        raise ValueError(f"{len(maps_ft)} fine-tuned layers but {len(maps_prior)} prior layers")
    if len(maps_ft) == 0:
        raise ValueError("attn_loss needs at least one layer")
    heads = list(num_heads) if isinstance(num_heads, (list, tuple)) else [int(num_heads)] * len(maps_ft)
    if len(heads) != len(maps_ft):
        raise ValueError(f"num_heads has {len(heads)} entries for {len(maps_ft)} layers")
    for a_t, a_p in zip(maps_ft, maps_prior):
        if pi is None and a_p.shape != a_t.shape:
            raise ValueError(f"prior maps {tuple(a_p.shape)} and fine-tuned maps {tuple(a_t.shape)} differ; pass pi")
    if pi is not None:
        b, _, nt = maps_ft[0].shape
        idx = pi.to(maps_ft[0].device).long()
        if idx.shape != (b, nt):
            raise ValueError(f"pi has shape {tuple(idx.shape)}, expected {(b, nt)} (batch, tokens of c*)")
    total = None
    # the layers of one resolution and head count at once: (L, B, N_query, N_tokens)
    for g in _groups([(tuple(m.shape), h) for m, h in zip(maps_ft, heads)]):
        a_t = torch.stack([maps_ft[i] for i in g]).float()
        a_p = torch.stack([maps_prior[i].detach() for i in g]).float().to(a_t.device)
        if pi is not None:
            a_p = torch.gather(a_p, 3, idx.clamp_min(0)[None, :, None, :].expand(a_t.shape))
            d = (a_t - a_p) * (idx >= 0)[None, :, None, :]
        else:
            d = a_t - a_p
        part = d.pow(2).sum(dim=(0, 2, 3)) / heads[g[0]]  # (B,)
        total = part if total is None else total + part
    return total.mean()


def dco_loss(loss_ft: torch.Tensor, loss_ref: torch.Tensor, beta: float = DCO_BETA) -> torch.Tensor:
    """DCO (Lee et al. 2024), per sample: −log σ(−β (L_θ − L_φ)) = softplus(β (L_θ − L_φ)).

    softplus is the stable form: log(1 + e^x) without overflow for large x and without log(0) for very
    negative x. The reference loss is detached. Returns (B,) float32.
    """
    return F.softplus(beta * (loss_ft.float() - loss_ref.detach().float().to(loss_ft.device)))


def total_loss(loss_dm: torch.Tensor, weights: torch.Tensor | None = None, l_mu: torch.Tensor | None = None,
               l_sigma: torch.Tensor | None = None, l_attn: torch.Tensor | None = None,
               lambda_dist: float = LAMBDA_DIST, lambda_attn: float = LAMBDA_ATTN) -> torch.Tensor:
    """Eq. 7: L = mean_i[w_i · L_DM,i] + λ_dist (L_μ + L_σ) + λ_attn L_attn.

    `loss_dm`: (B,) per-sample denoising loss after the usual sd-scripts weighting (min-SNR,
    prior_loss_weight); `weights`: `adaptive_weights(...)`, None for 1 (component off). A term given as
    None is left out (ablations). The mean is a plain batch mean, not renormalised by Σw: a bin that
    overfits really contributes less.
    """
    dm = loss_dm.float()
    if weights is not None:
        dm = dm * weights.to(dm.device).float()
    loss = dm.mean()
    if l_mu is not None or l_sigma is not None:
        rs = (l_mu if l_mu is not None else 0.0) + (l_sigma if l_sigma is not None else 0.0)
        loss = loss + lambda_dist * rs
    if l_attn is not None:
        loss = loss + lambda_attn * l_attn
    return loss
