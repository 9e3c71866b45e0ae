"""Adaptive augmentation (DESIGN.md §2.2): probabilities, masks, exact geometry and fills."""
import pytest
import torch

from apt_ext.augment import (AdaptiveAugment, apply_latent_aug, apply_pixel_aug, aug_probability, black_latent,
                             sample_aug_mask, zoom_rotate_params)


def test_aug_probability_clamps_to_p_max():
    p = aug_probability(torch.tensor([0.0, 0.5, 0.8, 0.9, 1.0, -0.1]), p_max=0.8)
    assert p.tolist() == pytest.approx([0.0, 0.5, 0.8, 0.8, 0.8, 0.0])
    gam = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 1.5
    assert (aug_probability(gam, 0.8) <= torch.tensor(0.8)).all()  # p_max as float32, like p


def test_empirical_frequency_matches_p():
    # N draws per p: the std of the frequency is sqrt(p(1−p)/N) <= 0.0035; tolerance 0.015 is > 4 std (seeded anyway)
    n = 20000
    ps = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0])
    mask = sample_aug_mask(ps.repeat(n), torch.Generator().manual_seed(1)).reshape(n, len(ps))
    freq = mask.float().mean(0)
    assert freq[0].item() == 0.0 and freq[-1].item() == 1.0
    assert freq[1:4].tolist() == pytest.approx([0.2, 0.5, 0.8], abs=0.015)
    # through AdaptiveAugment with γ = 1: p is capped at p_max = 0.8
    aug = AdaptiveAugment(p_max=0.8)
    x = torch.zeros(1000, 1, 2, 2)  # small images: the warp cost is per augmented sample
    _, m, _ = aug(x, torch.ones(1000), "pixel", generator=torch.Generator().manual_seed(2))
    assert m.float().mean().item() == pytest.approx(0.8, abs=0.05)  # std 0.0126 for N = 1000: 4 std


def test_zoom_rotate_params_ranges():
    s, a = zoom_rotate_params(5000, (1.0, 3.0), 15.0, torch.Generator().manual_seed(0))
    assert s.min() >= 1.0 and s.max() < 3.0 and a.min() >= -15.0 and a.max() < 15.0
    assert s.mean().item() == pytest.approx(2.0, abs=0.05) and a.mean().item() == pytest.approx(0.0, abs=0.5)
    with pytest.raises(ValueError, match="zoom-out"):
        zoom_rotate_params(2, (0.5, 2.0))


def test_unaugmented_samples_bit_exact():
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.rand(4, 3, 12, 10, generator=g) * 2 - 1).to(dtype)
        mask = torch.tensor([True, False, True, False])
        y = apply_pixel_aug(x, mask, torch.tensor([2.0, 2.5, 1.5, 3.0]), torch.tensor([10.0, -5.0, 0.0, 3.0]))
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3])
        assert not torch.equal(y[0], x[0]) and not torch.equal(y[2], x[2])
    x0 = x.clone()
    apply_latent_aug(x, mask, torch.full((4,), 2.0), torch.zeros(4), torch.zeros(3))
    assert torch.equal(x, x0)  # input never modified in place


@pytest.mark.parametrize("hw", [(16, 16), (16, 24)])
def test_zoom_out_by_two_of_white_image(hw):
    h, w = hw
    x = torch.ones(2, 3, h, w)
    y = apply_pixel_aug(x, torch.tensor([True, False]), torch.tensor([2.0, 2.0]), torch.tensor([0.0, 0.0]))
    # content scaled by 1/2 about the centre: rows h/4 .. 3h/4, columns w/4 .. 3w/4 white, the rest black (−1).
    # Pixel centres fall exactly on the content edge here, so no pixel is blended; the grid's float rounding
    # leaves ~1e-6 on the pixels next to the edge, and pixels further out are exactly −1.
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
    near = torch.zeros(h, w, dtype=torch.bool)
    near[h // 4 - 1 : 3 * h // 4 + 1, w // 4 - 1 : 3 * w // 4 + 1] = True
    assert torch.allclose(y[0][:, inside], torch.ones(()), atol=1e-5)
    assert torch.allclose(y[0][:, ~inside], -torch.ones(()), atol=1e-5)
    assert (y[0][:, ~near] == -1.0).all()
    assert y[0].mean().item() == pytest.approx(-1.0 + 2.0 * 0.25, abs=1e-5)  # a quarter of the area is white
    assert torch.equal(y[1], x[1])


def test_rotation_by_90_is_rot90_clockwise():
    x = torch.arange(3 * 16.0).reshape(1, 3, 4, 4) / 48
    y = apply_pixel_aug(x, torch.tensor([True]), torch.tensor([1.0]), torch.tensor([90.0]))
    assert torch.allclose(y, torch.rot90(x, -1, dims=(2, 3)), atol=1e-6)


def test_rotation_of_a_non_square_image_is_rigid():
    """On a 32x64 image (most buckets are not square) a rotation must turn the content about the centre, in pixel
    units: a mis-scaled matrix would shear it and move the subject off its circle. A small Gaussian blob's centroid
    must land where the rotation by hand puts it, at the same distance from the centre."""
    import math

    h, w, sigma = 32, 64, 1.5
    rows, cols = torch.arange(h, dtype=torch.float64) + 0.5 - h / 2, torch.arange(w, dtype=torch.float64) + 0.5 - w / 2
    Y, X = rows[:, None].expand(h, w), cols[None].expand(h, w)  # pixel-centre offsets from the image centre, y down
    starts = [(16.0, 0.0), (0.0, 8.0), (-12.0, -6.0)]  # (x, y) in pixels
    angles = [30.0, -25.0, 15.0]
    blobs = torch.stack([torch.exp(-((X - x) ** 2 + (Y - y) ** 2) / (2 * sigma ** 2)) for x, y in starts])
    img = (blobs * 2 - 1).float()[:, None].expand(3, 3, h, w)  # white blob on black
    out = apply_pixel_aug(img, torch.ones(3, dtype=torch.bool), torch.ones(3), torch.tensor(angles))
    for i, ((x, y), a) in enumerate(zip(starts, angles)):
        # positive angles turn clockwise on screen (y down): (x, y) -> (x cos a - y sin a, x sin a + y cos a)
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        ex, ey = x * c - y * s, x * s + y * c
        wgt = (out[i, 0].double() + 1) / 2
        cx, cy = (wgt * X).sum() / wgt.sum(), (wgt * Y).sum() / wgt.sum()
        assert (cx.item(), cy.item()) == (pytest.approx(ex, abs=0.1), pytest.approx(ey, abs=0.1))
        assert math.hypot(cx.item(), cy.item()) == pytest.approx(math.hypot(x, y), abs=0.1)


def test_antialiasing_suppresses_aliasing():
    # a one-pixel checkerboard zoomed out 3x: antialiased, the content is ~flat grey; without, it aliases
    n = 48
    cb = (((torch.arange(n)[:, None] + torch.arange(n)[None]) % 2) * 2 - 1.0).expand(1, 3, n, n)
    m, s, a = torch.tensor([True]), torch.tensor([3.0]), torch.tensor([0.0])
    centre = slice(n // 2 - 6, n // 2 + 6)
    good = apply_pixel_aug(cb, m, s, a)[0, :, centre, centre]
    bad = apply_pixel_aug(cb, m, s, a, antialias=False)[0, :, centre, centre]
    assert good.abs().max().item() < 0.05
    assert bad.abs().max().item() > 0.9


def test_latent_fill_in_border():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 4, 16, 16, generator=g)
    fill = torch.tensor([0.1, -0.2, 0.3, 0.4])
    y = apply_latent_aug(z, torch.tensor([True, True]), torch.tensor([2.0, 3.0]), torch.tensor([0.0, 10.0]), fill)
    # sample 0: s = 2, no rotation: everything outside rows/cols 4..11 is the fill (to float rounding of the
    # sampling grid next to the content edge, exactly further out)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[4:12, 4:12] = False
    far = torch.ones(16, 16, dtype=torch.bool)
    far[3:13, 3:13] = False
    assert torch.allclose(y[0][:, outside], fill[:, None].expand(4, int(outside.sum())), atol=1e-5)
    assert torch.equal(y[0][:, far], fill[:, None].expand(4, int(far.sum())))
    # sample 1: s = 3, rotated: the corners are far outside the content, exactly the fill
    for r, c in [(0, 0), (0, 15), (15, 0), (15, 15), (1, 8), (8, 1)]:
        assert torch.equal(y[1, :, r, c], fill)
    # the (C, 1, 1) form gives the same
    assert torch.equal(y, apply_latent_aug(z, torch.tensor([True, True]), torch.tensor([2.0, 3.0]),
                                           torch.tensor([0.0, 10.0]), fill[:, None, None]))
    with pytest.raises(ValueError, match="channels"):
        apply_latent_aug(z, torch.tensor([True, True]), torch.ones(2), torch.zeros(2), torch.zeros(3))


def test_adaptive_augment_call():
    aug = AdaptiveAugment()
    assert (aug.p_max, aug.scale_range, aug.rotation_deg) == (0.8, (1.0, 3.0), 15.0)
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    y, m, lm = aug(x, torch.zeros(3), "pixel", generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, x) and not m.any() and lm is None  # γ = 0: nothing happens
    y1, m1, _ = aug(x, torch.ones(3), "latent", fill_latent=torch.zeros(3), generator=torch.Generator().manual_seed(5))
    y2, m2, _ = aug(x, torch.ones(3), "latent", fill_latent=torch.zeros(3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(y1, y2) and torch.equal(m1, m2)  # reproducible with a generator
    for i in range(3):
        assert torch.equal(y1[i], x[i]) != bool(m1[i])
    with pytest.raises(ValueError, match="fill_latent"):
        aug(x, torch.ones(3), "latent")
    with pytest.raises(ValueError, match="auto"):
        aug(x, torch.ones(3), "auto")


def test_loss_mask_moves_with_the_content():
    """An alpha mask (any resolution: here the pixels', with latents 8x smaller) is warped with the same draw as the
    latents: the weights follow the content, the uncovered border weighs 0, unaugmented samples keep theirs exactly.
    The random stream is the one without a mask."""
    aug = AdaptiveAugment(p_max=1.0)
    z = torch.rand(2, 4, 8, 8)
    alpha = torch.zeros(2, 64, 64)
    alpha[:, 16:48, 16:48] = 1.0  # the subject in the middle
    gamma = torch.tensor([1.0, 0.0])  # the first sample is augmented, the second not
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    z_aug, m, a_aug = aug(z, gamma, "latent", fill_latent=torch.zeros(4), generator=g(), loss_mask=alpha)
    z_ref, m_ref, _ = aug(z, gamma, "latent", fill_latent=torch.zeros(4), generator=g())
    assert torch.equal(z_aug, z_ref) and torch.equal(m, m_ref) and m.tolist() == [True, False]
    assert torch.equal(a_aug[1], alpha[1])
    gen = g()
    torch.rand(2, generator=gen)  # the Bernoulli draw
    scales, angles = zoom_rotate_params(2, aug.scale_range, aug.rotation_deg, gen)
    expected = apply_pixel_aug(alpha[:, None] * 2 - 1, m, scales, angles)[:, 0] / 2 + 0.5  # as an image, black border
    assert torch.allclose(a_aug, expected, atol=1e-6)
    s = float(scales[0])
    assert float(a_aug[0].sum()) == pytest.approx(float(alpha[0].sum()) / s**2, rel=0.1)  # zoomed out by s: area / s²
    assert a_aug[0, 0, 0] == 0 and a_aug[0, 32, 32] == pytest.approx(1.0)  # border out of the loss, centre in


def test_black_latent_is_the_interior_of_a_black_image():
    """The fill latent is a black image's latent away from the image's edges: the central half (each side) of a
    256² image's 32×32 map, which is flat there, where the whole map of a 64² image (the first version's size, 8×8)
    is not flat anywhere and its mean was up to 0.19 off (this random VAE). It decodes closer to a black image than a zero latent."""
    from library.tiny_models import build_tiny_model

    vae = build_tiny_model("sd1").vae
    scale = vae.config.scaling_factor
    fill = black_latent(vae, scale, device="cpu", dtype=torch.float32)
    assert fill.shape == (4,) and fill.dtype == torch.float32
    with torch.no_grad():
        z = vae.encode(torch.full((1, 3, 256, 256), -1.0)).latent_dist.mean * scale  # (1, 4, 32, 32)
        z64 = vae.encode(torch.full((1, 3, 64, 64), -1.0)).latent_dist.mean * scale  # (1, 4, 8, 8)
        centre = z[..., 8:24, 8:24]
        assert torch.allclose(fill, centre.mean(dim=(0, 2, 3)))
        assert centre.std(dim=(2, 3)).max() < 0.01 < z64[..., 2:6, 2:6].std(dim=(2, 3)).min()  # measured 0.001, 0.1
        dec = [vae.decode(m / scale).sample[..., 64:192, 64:192].mean(dim=(0, 2, 3))
               for m in (fill.reshape(1, 4, 1, 1).expand(1, 4, 32, 32), z, torch.zeros(1, 4, 32, 32))]
    # the VAE is random, so compare with the decode of a black image's latent, not with −1 (measured 0.037 and 0.116)
    assert (dec[0] - dec[1]).abs().max() < 0.06 < (dec[2] - dec[1]).abs().max()
    # a half-precision VAE on the CPU (--cache_latents parks it there, in fp16 with --mixed_precision fp16) encodes in
    # float32: its fp16 encode took minutes at 256² on these cores; the VAE is left as it was, bit for bit
    half = vae.to(torch.float16)
    before = {k: v.clone() for k, v in half.state_dict().items()}
    seen, real = [], half.encode
    half.encode = lambda x: (seen.append((x.dtype, next(half.parameters()).dtype)), real(x))[1]
    assert black_latent(half, scale).dtype == torch.float32
    assert seen == [(torch.float32, torch.float32)]
    del half.encode
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float16 for k, v in half.state_dict().items())
