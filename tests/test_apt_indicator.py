"""OverfittingIndicator (DESIGN.md §2.1) against hand-computed EMA / γ sequences."""
import io
import math
import os

import pytest
import torch

from apt_ext.indicator import OverfittingIndicator, default_temperature


def f64(values):
    """Exact-value tests feed float64 losses, so 0.4 means 0.4 (the indicator computes in float64)."""
    return torch.tensor(values, dtype=torch.float64)


def g(diff, tau):
    """γ = clamp(1 − exp(−τ·diff), 0, 1)."""
    return min(max(1.0 - math.exp(-tau * diff), 0.0), 1.0)


def test_bin_edges():
    ind = OverfittingIndicator(num_bins=10, num_train_timesteps=1000)
    t = torch.tensor([0, 99, 100, 199, 500, 899, 900, 999])
    assert ind.bin_of(t).tolist() == [0, 0, 1, 1, 5, 8, 9, 9]
    assert ind.bin_of(t).dtype == torch.long
    # float timesteps floor the same way; out-of-range values are clamped
    assert ind.bin_of(torch.tensor([0.0, 99.9, 100.0, 999.0])).tolist() == [0, 0, 1, 9]
    assert ind.bin_of(torch.tensor([1000, 5000, -3])).tolist() == [9, 9, 0]
    # other bin counts: floor(t·B/T)
    four = OverfittingIndicator(num_bins=4, num_train_timesteps=1000)
    assert four.bin_of(torch.tensor([249, 250, 749, 750])).tolist() == [0, 1, 2, 3]


def test_ema_and_gamma_sequence():
    tau, a = 10.0, 0.1
    ind = OverfittingIndicator(num_bins=10, num_train_timesteps=1000, ema_alpha=a, temperature=tau)
    assert ind.gamma().tolist() == [0.0] * 10  # nothing seen

    # 1: bin 0 one sample (initialises), bin 1 two samples (averaged first), t=999 is reg (left out)
    ind.update(torch.tensor([50, 150, 160, 999]), f64([0.5, 0.4, 0.6, 0.3]),
               f64([0.4, 0.3, 0.3, 0.1]), torch.tensor([False, False, False, True]))
    p0, f0 = 0.5, 0.4
    p1, f1 = (0.4 + 0.6) / 2, (0.3 + 0.3) / 2
    assert ind.ema_prior[:2].tolist() == pytest.approx([p0, p1], abs=1e-15)
    assert ind.ema_ft[:2].tolist() == pytest.approx([f0, f1], abs=1e-15)
    assert ind.seen.tolist() == [True, True] + [False] * 8  # bin 9 only had a reg sample
    gam = ind.gamma()
    assert gam.dtype == torch.float32 and gam.shape == (10,)
    assert gam[0].item() == pytest.approx(g(0.1, tau), rel=1e-6)  # 1 − e^−1
    assert gam[1].item() == pytest.approx(g(0.2, tau), rel=1e-6)  # 1 − e^−2
    assert gam[2:].tolist() == [0.0] * 8

    # 2: one more sample in bins 0 and 1
    ind.update(torch.tensor([10, 120]), f64([0.3, 0.2]), f64([0.3, 0.25]))
    p0, f0 = 0.9 * 0.5 + 0.1 * 0.3, 0.9 * 0.4 + 0.1 * 0.3  # 0.48, 0.39
    p1, f1 = 0.9 * 0.5 + 0.1 * 0.2, 0.9 * 0.3 + 0.1 * 0.25  # 0.47, 0.295
    assert ind.ema_prior[:2].tolist() == pytest.approx([p0, p1], abs=1e-15)
    assert ind.ema_ft[:2].tolist() == pytest.approx([f0, f1], abs=1e-15)
    assert ind.gamma()[:2].tolist() == pytest.approx([g(0.09, tau), g(0.175, tau)], rel=1e-6)

    # 3: bin 0 only (t=99 is still bin 0); bin 1 unchanged
    ind.update(torch.tensor([99]), f64([0.1]), f64([0.5]))
    p0, f0 = 0.9 * 0.48 + 0.1 * 0.1, 0.9 * 0.39 + 0.1 * 0.5  # 0.442, 0.401
    assert ind.ema_prior[0].item() == pytest.approx(p0, abs=1e-15)
    assert ind.ema_ft[0].item() == pytest.approx(f0, abs=1e-15)
    assert ind.ema_prior[1].item() == pytest.approx(0.47, abs=1e-15)
    assert ind.gamma()[0].item() == pytest.approx(g(0.041, tau), rel=1e-5)

    # 4: fine-tuned worse than prior in bin 1 -> γ clamped to 0; t=100 is bin 1
    ind.update(torch.tensor([100]), f64([0.0]), f64([3.0]))
    p1, f1 = 0.9 * 0.47, 0.9 * 0.295 + 0.1 * 3.0  # 0.423, 0.5655
    assert ind.ema_prior[1].item() == pytest.approx(p1, abs=1e-15)
    assert ind.ema_ft[1].item() == pytest.approx(f1, abs=1e-15)
    assert ind.gamma()[1].item() == 0.0

    # 5: a batch of reg samples only changes nothing but the step count
    before = ind.state_dict()
    ind.update(torch.tensor([500]), f64([1.0]), f64([0.0]), torch.tensor([True]))
    assert torch.equal(ind.ema_prior, before["ema_prior"]) and torch.equal(ind.seen, before["seen"])
    assert ind.step == 5
    assert ind.bin_updates.tolist() == [3, 3] + [0] * 8

    # gamma_for: γ of each sample's bin, pre-update state
    assert ind.gamma_for(torch.tensor([0, 150, 999])).tolist() == pytest.approx([g(0.041, tau), 0.0, 0.0], rel=1e-5)


def test_gamma_saturates_and_stays_finite():
    ind = OverfittingIndicator(temperature=1000.0)
    ind.update(torch.tensor([0, 900]), torch.tensor([10.0, 0.0]), torch.tensor([0.0, 10.0]))  # exp(−1e4), exp(+1e4)
    gam = ind.gamma()
    assert gam[0].item() == 1.0 and gam[9].item() == 0.0 and torch.isfinite(gam).all()


def test_non_finite_losses_are_left_out():
    ind = OverfittingIndicator()
    ind.update(torch.tensor([0, 10, 500]), f64([0.5, float("nan"), 0.2]), f64([0.4, 0.1, float("inf")]))
    assert ind.ema_prior[0].item() == 0.5 and ind.ema_ft[0].item() == 0.4  # only the first sample counted
    assert ind.seen.tolist() == [True] + [False] * 9
    assert torch.isfinite(ind.gamma()).all()


def test_inputs_on_other_dtypes_and_with_grad():
    ind = OverfittingIndicator()
    lp = torch.tensor([0.5, 0.25], dtype=torch.bfloat16, requires_grad=True)
    lf = torch.tensor([0.25, 0.125], dtype=torch.float16)
    ind.update(torch.tensor([0, 999]), lp, lf)
    assert ind.ema_prior.dtype == torch.float64 and not ind.ema_prior.requires_grad
    assert ind.ema_prior[[0, 9]].tolist() == [0.5, 0.25]


def test_batch_size_mismatch_raises():
    with pytest.raises(ValueError, match="batch sizes differ"):
        OverfittingIndicator().update(torch.tensor([0, 1]), torch.tensor([0.1]), torch.tensor([0.1, 0.2]))


def test_sync_update_single_process_equals_update():
    class OneProcess:
        num_processes = 1
        device = torch.device("cpu")

    args = (torch.tensor([5, 105, 110, 950]), torch.tensor([0.3, 0.2, 0.4, 0.1]), torch.tensor([0.2, 0.1, 0.1, 0.1]),
            torch.tensor([False, False, False, True]))
    a, b, c = OverfittingIndicator(), OverfittingIndicator(), OverfittingIndicator()
    for _ in range(3):
        a.update(*args)
        b.sync_update(None, *args)
        c.sync_update(OneProcess(), *args)
    for other in (b, c):
        sa, so = a.state_dict(), other.state_dict()
        assert sa.keys() == so.keys() and all(torch.equal(sa[k], so[k]) for k in sa)


def _filled():
    ind = OverfittingIndicator(temperature=10.0)
    ind.update(torch.tensor([5, 305, 310]), torch.tensor([0.3, 0.2, 0.4]), torch.tensor([0.2, 0.1, 0.1]))
    ind.update(torch.tensor([5]), torch.tensor([0.1]), torch.tensor([0.05]))
    return ind


def test_state_dict_round_trip_torch_save():
    ind = _filled()
    buf = io.BytesIO()
    torch.save(ind.state_dict(), buf)
    buf.seek(0)
    new = OverfittingIndicator(temperature=10.0)
    new.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(new.ema_prior, ind.ema_prior) and torch.equal(new.ema_ft, ind.ema_ft)
    assert torch.equal(new.seen, ind.seen) and torch.equal(new.bin_updates, ind.bin_updates)
    assert new.step == ind.step == 2
    assert torch.equal(new.gamma(), ind.gamma())
    # the copy is independent
    new.update(torch.tensor([5]), torch.tensor([9.0]), torch.tensor([0.0]))
    assert ind.ema_prior[0].item() != new.ema_prior[0].item()


def test_state_dict_round_trip_safetensors(tmp_path):
    import safetensors.torch as st
    ind = _filled()
    st.save_file(ind.state_dict(), str(tmp_path / "apt_indicator.safetensors"))
    new = OverfittingIndicator(temperature=10.0)
    new.load_state_dict(st.load_file(str(tmp_path / "apt_indicator.safetensors")))
    assert torch.equal(new.gamma(), ind.gamma()) and new.step == 2 and torch.equal(new.seen, ind.seen)


def test_load_state_without_bin_updates_counts_each_seen_bin_once():
    """A state saved before `bin_updates` existed still resumes: each seen bin counts as updated once (it was
    updated at least once), unseen bins 0, and the counts go on from there; the EMAs and γ are restored as saved."""
    ind = _filled()
    legacy = {k: v for k, v in ind.state_dict().items() if k != "bin_updates"}
    new = OverfittingIndicator(temperature=10.0)
    new.load_state_dict(legacy)
    assert new.bin_updates.tolist() == [1, 0, 0, 1, 0, 0, 0, 0, 0, 0]  # bins 0 (t=5) and 3 (t=305, 310) seen
    assert torch.equal(new.gamma(), ind.gamma()) and new.step == 2
    new.update(torch.tensor([5, 999]), f64([0.2, 0.2]), f64([0.1, 0.1]))
    assert new.bin_updates.tolist() == [2, 0, 0, 1, 0, 0, 0, 0, 0, 1]


def test_gamma_seen_mean_averages_the_seen_bins_only():
    """The progress bar's γ is the mean over the bins seen so far, not over all B bins: with 2 of 10 bins seen a
    division by 10 would show a fifth of the real overfitting. 0 before any update."""
    tau = 10.0
    ind = OverfittingIndicator(temperature=tau)
    assert ind.gamma_seen_mean().item() == 0.0
    ind.update(torch.tensor([50, 650]), f64([0.5, 0.3]), f64([0.4, 0.25]))  # bins 0 and 6: diffs 0.1 and 0.05
    assert ind.gamma_seen_mean().dim() == 0
    assert ind.gamma_seen_mean().item() == pytest.approx((g(0.1, tau) + g(0.05, tau)) / 2, rel=1e-6)


def test_load_state_dict_rejects_other_bins():
    with pytest.raises(ValueError, match="5 bins"):
        OverfittingIndicator(num_bins=10).load_state_dict(OverfittingIndicator(num_bins=5).state_dict())


def test_defaults_and_logs():
    assert [default_temperature(a) for a in ("sdxl", "sd1", "sd2")] == [1000.0, 100.0, 100.0]
    ind = OverfittingIndicator()
    assert (ind.num_bins, ind.num_train_timesteps, ind.ema_alpha) == (10, 1000, 0.1)
    ind.update(torch.tensor([650]), f64([0.3]), f64([0.29]))
    logs = ind.logs()
    assert set(logs) == {"apt/gamma_bin6", "apt/ema_prior_bin6", "apt/ema_ft_bin6"}
    assert logs["apt/gamma_bin6"] == pytest.approx(1 - math.exp(-100 * 0.01), rel=1e-5)
    assert "bins=10" in repr(ind) and "step=1" in repr(ind)


def test_lookup_and_update_never_read_the_device():
    """On the meta device every host read (.item(), .cpu(), bool(), .tolist()) raises: γ lookup, EMA update and
    the γ copy kept for the heatmap must be pure device ops (issue 6: no sync inside the step)."""
    ind = OverfittingIndicator(device="meta")
    t = torch.tensor([5, 950, 420], device="meta")
    g = ind.gamma_for(t)
    assert g.device.type == "meta" and g.shape == (3,)
    ind.update(t, torch.ones(3, device="meta"), torch.ones(3, device="meta"), torch.zeros(3, dtype=torch.bool, device="meta"))
    ind.gamma().clone()
    with pytest.raises(Exception):
        ind.logs()  # the one place that reads values


def test_gamma_heatmap_pixels_show_each_bins_gamma_in_its_row_and_column(tmp_path):
    """apt_ext/heatmap (the paper's Fig. 6, written beside every LoRA file): the pixel of bin b at step s has the
    colour of γ_b(s), bin 0 on the top row and the first step on the left, on the documented dark-blue -> green ->
    yellow scale. A flipped scale, swapped rows or a wrong blend show a user overfitting where there is none.
    Reference colours by hand: γ 0 -> stop 0 (68, 1, 84); γ 1 -> stop 4 (253, 231, 37); γ 0.5 -> stop 2
    (33, 145, 140); γ 0.125 -> halfway between stops 0 and 1: (63.5, 41.5, 111.5) rounded half-to-even (64, 42, 112)."""
    from PIL import Image

    from apt_ext.heatmap import render_gamma_heatmap, save_gamma_heatmap

    history = [(10, [0.0, 1.0]), (20, [0.5, 0.125])]
    img = render_gamma_heatmap(history, width=400, row_height=18)
    left, top, row_h, col_w = 58, 22, 18, 200  # layout: label margin 58 px, title 22 px; 400 px / 2 steps
    want = {(0, 0): (68, 1, 84), (1, 0): (253, 231, 37), (0, 1): (33, 145, 140), (1, 1): (64, 42, 112)}
    for (b, s), rgb in want.items():
        for dy, dx in ((1, 1), (row_h - 2, col_w - 2)):  # both corners of the cell
            assert img.getpixel((left + s * col_w + dx, top + b * row_h + dy)) == rgb, (b, s, dy, dx)
    # a long run is resampled to 400 columns: the first and last columns are the first and last steps
    long = [(s, [1.0 if s == 799 else 0.0]) for s in range(800)]
    img = render_gamma_heatmap(long, width=400, row_height=18)
    assert img.getpixel((left, top + 5)) == (68, 1, 84) and img.getpixel((left + 399, top + 5)) == (253, 231, 37)
    assert img.getpixel((left + 398, top + 5)) == (68, 1, 84)

    # saved as a PNG that replaces the previous one (each save of the LoRA file rewrites its heatmap)
    path = str(tmp_path / "lora_gamma.png")
    save_gamma_heatmap(history, path)
    save_gamma_heatmap([(30, [1.0, 1.0])], path)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.convert("RGB").getpixel((left + 1, top + 1)) == (253, 231, 37)
    assert sorted(os.listdir(tmp_path)) == ["lora_gamma.png"]
