"""APT losses (DESIGN.md §2.3–2.5, §2.7) and DCO against hand-computed values."""
import math

import pytest
import torch

from apt_ext.losses import (LAMBDA_ATTN, LAMBDA_DIST, adaptive_weights, attn_loss, dco_loss, hidden_stats, rs_losses,
                            total_loss)


def test_adaptive_weights():
    w = adaptive_weights(torch.tensor([0.25, 0.5, 0.9, 0.0]), torch.tensor([False, True, False, False]))
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([0.75, 1.0, 0.1, 1.0])
    assert adaptive_weights(torch.tensor([0.5, 1.0])).tolist() == [0.5, 0.0]


def test_hidden_stats_scalar_and_per_channel():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0]],  # sample 0: tokens × channels
                      [[0.0, 0.0], [0.0, 2.0]]], dtype=torch.bfloat16)
    mu, sigma = hidden_stats(h, "scalar")
    assert mu.dtype == torch.float32
    # sample 0: mean 2.5, var = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    # sample 1: mean 0.5, var = (3·0.25 + 2.25) / 4 = 0.75
    assert mu.tolist() == pytest.approx([2.5, 0.5])
    assert sigma.tolist() == pytest.approx([math.sqrt(1.25), math.sqrt(0.75)])
    mu, sigma = hidden_stats(h, "per_channel")
    # sample 0: channel 0 = [1, 3] (mean 2, std 1), channel 1 = [2, 4] (mean 3, std 1); sample 1: [0, 0], [0, 2]
    assert mu.tolist() == [[2.0, 3.0], [0.0, 1.0]]
    assert sigma.tolist() == [[1.0, 1.0], [0.0, 1.0]]
    # (B, C, H, W) layout: channel axis 1, same numbers
    h4 = h.float().permute(0, 2, 1).reshape(2, 2, 1, 2)
    mu4, sigma4 = hidden_stats(h4, "per_channel")
    assert mu4.tolist() == mu.tolist() and sigma4.tolist() == sigma.tolist()
    assert hidden_stats(h4, "scalar")[0].tolist() == pytest.approx([2.5, 0.5])
    with pytest.raises(ValueError):
        hidden_stats(h, "median")


def test_rs_losses_scalar():
    # 2 layers, batch 2
    ft = [(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])), (torch.tensor([0.5, 0.0]), torch.tensor([2.0, 1.0]))]
    pr = [(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 3.0])), (torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))]
    l_mu, l_sigma = rs_losses(ft, pr)
    # μ: sample 0: 1 + 0.25, sample 1: 4 + 1 -> mean (1.25 + 5) / 2
    assert l_mu.item() == pytest.approx(3.125)
    # σ: sample 0: 0 + 1, sample 1: 4 + 0 -> mean 2.5
    assert l_sigma.item() == pytest.approx(2.5)


def test_rs_losses_per_channel_mean_over_channels():
    ft = [(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 1.0]]))]
    pr = [(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]]))]
    l_mu, l_sigma = rs_losses(ft, pr)
    assert l_mu.item() == pytest.approx((1.0 + 9.0) / 2)
    assert l_sigma.item() == pytest.approx((1.0 + 0.0) / 2)


def test_rs_losses_gradient_only_to_fine_tuned():
    mu_t = torch.tensor([1.0, 2.0], requires_grad=True)
    mu_p = torch.tensor([0.0, 0.0], requires_grad=True)
    l_mu, _ = rs_losses([(mu_t, torch.ones(2))], [(mu_p, torch.ones(2))])
    l_mu.backward()
    assert mu_t.grad.tolist() == pytest.approx([1.0, 2.0])  # d/dμ mean((μ−0)²) = μ (2μ/2)
    assert mu_p.grad is None


def _attn_case():
    # layer 1: non-identity π, different per sample
    p1 = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]],
                       [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    pi = torch.tensor([[2, 0, 0], [1, 2, 0]])
    # sample 0: A_φ[..., π] = [[3, 1, 1], [6, 4, 4]]; sample 1: [[1, 0, 0], [0, 0, 1]]
    t1 = torch.tensor([[[3.0, 1.0, 2.0], [6.0, 4.0, 4.0]],  # D = [[0, 0, 1], [0, 0, 0]] -> ||D||² = 1
                       [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # D = −gathered -> ||D||² = 2
    # layer 2: D = 0.5 everywhere -> ||D||² = 6 · 0.25 = 1.5 per sample (π on a constant map changes nothing)
    p2, t2 = torch.full((2, 2, 3), 0.5), torch.ones(2, 2, 3)
    return [t1, t2], [p1, p2], pi


def test_attn_loss_hand_computed():
    maps_t, maps_p, pi = _attn_case()
    # H = 2: sample 0: 1/2 + 1.5/2 = 1.25, sample 1: 2/2 + 1.5/2 = 1.75 -> mean 1.5
    assert attn_loss(maps_t, maps_p, pi, num_heads=2).item() == pytest.approx(1.5)
    # per-layer heads [2, 3]: sample 0: 0.5 + 0.5, sample 1: 1 + 0.5 -> mean 1.25
    assert attn_loss(maps_t, maps_p, pi, num_heads=[2, 3]).item() == pytest.approx(1.25)


def test_attn_loss_identity_pi_and_gradient():
    maps_t, maps_p, _ = _attn_case()
    ident = torch.arange(3).expand(2, 3)
    assert attn_loss(maps_t, maps_p, None, 2).item() == pytest.approx(attn_loss(maps_t, maps_p, ident, 2).item())
    # identity: layer 1 sample 0: D = [[2, -1, -1], [2, -1, -2]] -> ||D||² = 15; sample 1: D = −p -> 2
    # per sample (H = 2): 15/2 + 0.75 and 2/2 + 0.75 -> mean 5
    assert attn_loss(maps_t, maps_p, None, 2).item() == pytest.approx(((7.5 + 0.75) + (1.0 + 0.75)) / 2)
    t = maps_t[0].clone().requires_grad_(True)
    p = maps_p[0].clone().requires_grad_(True)
    attn_loss([t], [p], None, 2).backward()
    assert p.grad is None and torch.allclose(t.grad, (t - p).detach() * 2 / 2 / 2)  # d/dA (1/H)||D||² / B
    with pytest.raises(ValueError, match="pi has shape"):
        attn_loss(maps_t, maps_p, torch.zeros(2, 4, dtype=torch.long), 2)


def test_attn_loss_prior_with_more_tokens():
    # c has 4 token columns, c* 3: π picks 3 of them
    p = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    t = torch.tensor([[[0.4, 0.1, 0.1]]])
    pi = torch.tensor([[3, 0, 0]])  # gathered [0.4, 0.1, 0.1] -> D = 0
    assert attn_loss([t], [p], pi, 1).item() == 0.0
    assert attn_loss([t], [p], torch.tensor([[0, 1, 2]]), 1).item() == pytest.approx(0.09 + 0.01 + 0.04)


def test_dco_loss():
    beta = 1000.0
    lf = torch.tensor([0.101, 0.098, 0.1], dtype=torch.float64)
    lr = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)
    d = dco_loss(lf, lr, beta)
    # β·Δ = [1, −2, 0] -> −log σ(−βΔ) = log(1 + e^{βΔ})
    ref = [math.log(1 + math.e), math.log(1 + math.exp(-2)), math.log(2)]
    assert d.tolist() == pytest.approx(ref, rel=1e-4)
    expl = -torch.log(torch.sigmoid(-beta * (lf - lr)))
    assert torch.allclose(d.double(), expl, rtol=1e-4)
    # large |Δ|: finite, ≈ βΔ for Δ > 0 and ≈ 0 for Δ < 0, finite gradients
    lf = torch.tensor([10.0, -10.0, 0.5], requires_grad=True)
    d = dco_loss(lf, torch.zeros(3))
    assert torch.isfinite(d).all()
    assert d[0].item() == pytest.approx(1e4) and d[1].item() == 0.0
    d.sum().backward()
    assert torch.isfinite(lf.grad).all() and lf.grad[0].item() == pytest.approx(beta)


def test_total_loss():
    assert (LAMBDA_DIST, LAMBDA_ATTN) == (30.0, 3e-4)
    loss_dm = torch.tensor([1.0, 2.0])
    w = torch.tensor([0.5, 1.0])
    out = total_loss(loss_dm, w, torch.tensor(0.1), torch.tensor(0.2), torch.tensor(100.0))
    # mean(0.5, 2) + 30·(0.1 + 0.2) + 3e-4·100 = 1.25 + 9 + 0.03
    assert out.item() == pytest.approx(10.28)
    assert total_loss(loss_dm).item() == pytest.approx(1.5)  # all components off: plain mean
    assert total_loss(loss_dm, w, l_attn=torch.tensor(100.0), lambda_attn=1e-2).item() == pytest.approx(2.25)


def test_attn_loss_leaves_out_dropped_columns():
    """π = -1 (mode "drop": the identifier's column) contributes nothing; other columns gather through π."""
    a_t = torch.zeros(1, 2, 3)
    a_t[0, :, 1] = 1.0  # the identifier column attends strongly in the fine-tuned map
    a_p = torch.tensor([[[0.5, 0.0, 0.25], [0.5, 0.0, 0.25]]])
    pi = torch.tensor([[0, -1, 2]])
    # columns 0 and 2: (0-0.5)^2*2 + (0-0.25)^2*2 = 0.625; column 1 left out; H = 1
    assert attn_loss([a_t], [a_p], pi, 1).item() == pytest.approx(0.625)
    pi_class = torch.tensor([[0, 2, 2]])  # mode "class": the identifier maps to the class column
    assert attn_loss([a_t], [a_p], pi_class, 1).item() == pytest.approx(0.625 + 2 * (1 - 0.25) ** 2)


def _per_layer_attn(maps_ft, maps_prior, pi, heads):
    """Eq. 6 one layer at a time, as written in the paper."""
    total = 0
    for a_t, a_p, h in zip(maps_ft, maps_prior, heads):
        if pi is not None:
            a_p = torch.stack([a_p[i][:, pi[i].clamp_min(0)] for i in range(a_t.shape[0])])
            a_p = a_p * (pi >= 0)[:, None, :]
            a_t = a_t * (pi >= 0)[:, None, :]
        total = total + ((a_t - a_p) ** 2).sum(dim=(1, 2)) / h
    return total.mean()


def test_batched_losses_equal_the_per_layer_sums_over_mixed_shapes_and_heads():
    """SDXL-like up blocks: two resolutions, head counts that differ within one resolution, a π with a dropped
    column; per-channel RS stats of different widths. The batched reductions equal the layer-by-layer formulas."""
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 16, 5)] * 3 + [(2, 64, 5)] * 2 + [(2, 16, 5)]
    heads = [20, 20, 10, 10, 10, 20]
    ft = [torch.rand(s, generator=g, requires_grad=True) for s in shapes]
    prior = [torch.rand(s[0], s[1], 7, generator=g) for s in shapes]
    pi = torch.tensor([[0, 1, -1, 3, 6], [0, 2, 3, -1, 4]])
    got = attn_loss(ft, prior, pi, heads)
    ref = _per_layer_attn(ft, prior, pi, heads)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    g1 = torch.autograd.grad(got, ft)
    g2 = torch.autograd.grad(_per_layer_attn(ft, prior, pi, heads), ft)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(g1, g2))

    widths = [4, 8, 4, 16]
    st_ft = [(torch.randn(2, c, generator=g), torch.rand(2, c, generator=g)) for c in widths]
    st_pr = [(torch.randn(2, c, generator=g), torch.rand(2, c, generator=g)) for c in widths]
    l_mu, l_sigma = rs_losses(st_ft, st_pr)
    ref_mu = sum(((a - b) ** 2).mean(dim=1) for (a, _), (b, _) in zip(st_ft, st_pr)).mean()
    ref_sigma = sum(((a - b) ** 2).mean(dim=1) for (_, a), (_, b) in zip(st_ft, st_pr)).mean()
    assert l_mu.item() == pytest.approx(ref_mu.item(), rel=1e-6)
    assert l_sigma.item() == pytest.approx(ref_sigma.item(), rel=1e-6)


def test_loss_kernels_do_not_grow_with_the_number_of_layers_of_one_shape():
    """A GPU step is launch-bound: 36 SDXL up-block layers must not cost 36x the loss kernels."""
    from bench.op_count import count_ops

    def ops(n):
        ft = [torch.rand(1, 16, 5) for _ in range(n)]
        prior = [m + 0.1 for m in ft]
        stats = [(torch.rand(1), torch.rand(1)) for _ in range(n)]
        _, c1 = count_ops(lambda: attn_loss(ft, prior, torch.tensor([[0, 1, 2, 3, -1]]), 10))
        _, c2 = count_ops(lambda: rs_losses(stats, stats))
        return sum(c1.values()) + sum(c2.values())

    assert ops(30) == ops(2)
