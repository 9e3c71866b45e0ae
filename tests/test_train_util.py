"""library/noise.py (noise, timesteps, targets), library/losses.py (losses, weighting, flag checks),
library/optimizers.py (optimizers, schedules), library/train_util.py (names, dtypes); library/config_file.py."""
import argparse
import logging
import math
import os
import sys

import pytest
import torch

from library import config_file as cf
from library import losses as loss_lib, noise as noise_lib, optimizers as optim_lib, train_util as tu
from library.train_util import TrainingSetupError


def make_noise_scheduler(v_parameterization):
    """sd-scripts' training scheduler (KOHYA_COMPAT 6.1); built directly so the test does not import model_util,
    whose UNet/CLIP imports cost more than all these tests."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, prediction_type="v_prediction" if v_parameterization else "epsilon")


def ns(**kw):
    return argparse.Namespace(**kw)


@pytest.fixture(scope="module")
def eps_sched():
    return make_noise_scheduler(False)


@pytest.fixture(scope="module")
def v_sched():
    return make_noise_scheduler(True)


def hand_snr(sched, ts):
    ac = sched.alphas_cumprod.double()
    return torch.tensor([float(ac[t] / (1 - ac[t])) for t in ts], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# min-SNR and the other weightings
# ---------------------------------------------------------------------------------------------------------------

TS = [0, 10, 250, 500, 999]


def test_min_snr_eps_hand_computed(eps_sched):
    ts = torch.tensor(TS)
    loss = torch.ones(len(TS))
    got = loss_lib.apply_snr_weight(loss, ts, eps_sched, 5.0, v_prediction=False)
    snr = hand_snr(eps_sched, TS)
    want = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    # sanity on the shape of the curve: low-noise steps are damped, high-noise steps keep weight 1
    assert got[0] < 0.01 and got[-1] == pytest.approx(1.0)


def test_min_snr_v_hand_computed(v_sched):
    ts = torch.tensor(TS)
    loss = torch.full((len(TS),), 2.0)
    got = loss_lib.apply_snr_weight(loss, ts, v_sched, 5.0, v_prediction=True)
    snr = hand_snr(v_sched, TS)
    want = 2.0 * torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


def test_snr_matches_alphas_cumprod(eps_sched):
    # t=500 by hand from the scaled_linear betas
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)[500]
    assert float(loss_lib.snr_of(eps_sched, torch.tensor([500]))[0]) == pytest.approx(float(ab / (1 - ab)), rel=1e-4)


def test_post_process_loss_order_and_flags(eps_sched, v_sched):
    ts = torch.tensor([5, 300, 900])
    loss = torch.tensor([1.0, 2.0, 3.0])
    # nothing set → unchanged
    assert torch.equal(loss_lib.post_process_loss(loss, ns(), ts, eps_sched), loss)

    snr = hand_snr(eps_sched, ts.tolist())
    capped = torch.clamp(snr, max=1000)
    args = ns(min_snr_gamma=5.0, debiased_estimation_loss=True, v_pred_like_loss=0.5)
    got = loss_lib.post_process_loss(loss, args, ts, eps_sched).double()
    want = loss.double() * torch.clamp(snr, max=5.0) / snr
    want = want + want / (capped / (capped + 1)) * 0.5
    want = want / torch.sqrt(capped)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)

    snr_v = hand_snr(v_sched, ts.tolist())
    capped_v = torch.clamp(snr_v, max=1000)
    args = ns(min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True, debiased_estimation_loss=True)
    got = loss_lib.post_process_loss(loss, args, ts, v_sched).double()
    want = loss.double() * torch.clamp(snr_v, max=5.0) / (snr_v + 1)
    want = want * capped_v / (capped_v + 1)
    want = want / (capped_v + 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_snr_weightings_cap_snr_at_1000_like_sd_scripts(eps_sched, v_sched):
    """The debiased / v-pred-scaling / v-pred-like weights use min(SNR, 1000) (sd-scripts custom_train_functions):
    SD's t=0 has SNR ~1175, and an uncapped weight makes t=0 samples weigh differently from sd-scripts runs."""
    # t=0 by hand: alphā_0 = 1 - beta_0 = 1 - 0.00085, SNR = 0.99915 / 0.00085 = 1175.5 > 1000; t=1 is ~580
    assert float(loss_lib.snr_of(eps_sched, torch.tensor([0]))[0]) == pytest.approx(0.99915 / 0.00085, rel=1e-4)
    assert float(loss_lib.snr_of(eps_sched, torch.tensor([1]))[0]) < 1000
    t0 = torch.tensor([0])
    loss = torch.tensor([2.0])
    got = loss_lib.post_process_loss(loss, ns(debiased_estimation_loss=True), t0, eps_sched)
    assert float(got[0]) == pytest.approx(2.0 / math.sqrt(1000), rel=1e-5)  # not 2 / sqrt(1175.5) = 0.0583
    got = loss_lib.post_process_loss(loss, ns(debiased_estimation_loss=True), t0, v_sched)
    assert float(got[0]) == pytest.approx(2.0 / 1001, rel=1e-5)  # not 2 / 1176.5
    got = loss_lib.post_process_loss(loss, ns(v_pred_like_loss=0.5), t0, eps_sched)
    assert float(got[0]) == pytest.approx(2.0 + 2.0 / (1000 / 1001) * 0.5, rel=1e-6)
    got = loss_lib.post_process_loss(loss, ns(scale_v_pred_loss_like_noise_pred=True), t0, v_sched)
    assert float(got[0]) == pytest.approx(2.0 * 1000 / 1001, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# targets, noise, timesteps
# ---------------------------------------------------------------------------------------------------------------


def test_v_target_formula(v_sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    ts = torch.tensor([0, 400, 999])
    got = noise_lib.get_target(v_sched, x0, noise, ts)
    ab = v_sched.alphas_cumprod[ts].view(-1, 1, 1, 1)
    torch.testing.assert_close(got, ab.sqrt() * noise - (1 - ab).sqrt() * x0, rtol=1e-5, atol=1e-6)
    assert v_sched.alphas_cumprod.device.type == "cpu"


def test_eps_target_is_noise(eps_sched):
    noise = torch.randn(2, 4, 4, 4)
    assert noise_lib.get_target(eps_sched, torch.randn(2, 4, 4, 4), noise, torch.tensor([1, 2])) is noise


def test_noise_offset_adds_per_channel_constant():
    latents = torch.randn(2, 4, 8, 8)
    shape = latents.shape
    noise = noise_lib.sample_noise(ns(noise_offset=0.1), latents, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g)
    offset = torch.randn(2, 4, 1, 1, generator=g)
    torch.testing.assert_close(noise, base + 0.1 * offset)
    # the added part is constant over H, W for each (sample, channel)
    diff = noise - base
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)


def test_adaptive_noise_scale():
    latents = torch.randn(2, 4, 8, 8) + 0.5
    noise = noise_lib.sample_noise(ns(noise_offset=0.1, adaptive_noise_scale=0.2), latents, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    base = torch.randn(latents.shape, generator=g)
    offset = 0.1 + 0.2 * latents.mean(dim=(2, 3), keepdim=True).abs()
    torch.testing.assert_close(noise, base + offset * torch.randn(2, 4, 1, 1, generator=g))


def test_adaptive_noise_scale_uses_the_size_of_a_negative_latent_mean():
    """--adaptive_noise_scale adds scale·|channel mean| to the offset (sd-scripts apply_noise_offset): a dark
    channel (negative mean) gets a larger offset too, not one cancelled (and clamped to 0) by its sign."""
    means = torch.tensor([-0.5, 0.5, -2.0, 0.0])
    latents = means.view(1, 4, 1, 1) + torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # (1,4,2,2), channel mean exact
    noise = noise_lib.sample_noise(ns(noise_offset=0.1, adaptive_noise_scale=0.2), latents,
                                   torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    base = torch.randn(latents.shape, generator=g)
    offset = torch.tensor([0.2, 0.2, 0.5, 0.1]).view(1, 4, 1, 1)  # 0.1 + 0.2 * |mean|
    torch.testing.assert_close(noise, base + offset * torch.randn(1, 4, 1, 1, generator=g))


def test_noise_offset_random_strength_bounded():
    latents = torch.zeros(1, 4, 4, 4)
    for seed in range(5):
        noise = noise_lib.sample_noise(ns(noise_offset=0.1, noise_offset_random_strength=True), latents,
                                torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(latents.shape, generator=g)
        strength = torch.rand(1, generator=g)
        torch.testing.assert_close(noise, base + strength * 0.1 * torch.randn(1, 4, 1, 1, generator=g))


def test_multires_noise_is_unit_std_and_seeded():
    latents = torch.zeros(2, 4, 32, 32)
    args = ns(multires_noise_iterations=6, multires_noise_discount=0.3)
    a = noise_lib.sample_noise(args, latents, torch.Generator().manual_seed(1))
    b = noise_lib.sample_noise(args, latents, torch.Generator().manual_seed(1))
    assert a.shape == latents.shape and torch.equal(a, b)
    assert float(a.std()) == pytest.approx(1.0, abs=1e-5)


def test_timesteps_in_range(eps_sched):
    g = torch.Generator().manual_seed(0)
    t = noise_lib.sample_timesteps(ns(min_timestep=100, max_timestep=200), eps_sched, 4000, generator=g)
    assert t.dtype == torch.long and int(t.min()) >= 100 and int(t.max()) < 200
    assert int(t.min()) == 100 and int(t.max()) == 199  # uniform over the whole range
    t = noise_lib.sample_timesteps(ns(), eps_sched, 4000, generator=g)
    assert int(t.min()) >= 0 and int(t.max()) <= 999
    t = noise_lib.sample_timesteps(ns(min_timestep=300, max_timestep=300), eps_sched, 5)
    assert t.tolist() == [300] * 5


def test_get_noise_noisy_latents_and_timesteps(eps_sched):
    latents = torch.randn(3, 4, 8, 8)
    noise, noisy, t = noise_lib.get_noise_noisy_latents_and_timesteps(
        ns(min_timestep=10, max_timestep=20), eps_sched, latents, torch.Generator().manual_seed(0))
    assert noise.shape == noisy.shape == latents.shape and t.shape == (3,)
    assert ((t >= 10) & (t < 20)).all()
    torch.testing.assert_close(noisy, eps_sched.add_noise(latents, noise, t))
    # pre-drawn timesteps are used as they are
    fixed = torch.tensor([5, 6, 7])
    _, _, t2 = noise_lib.get_noise_noisy_latents_and_timesteps(ns(), eps_sched, latents, timesteps=fixed)
    assert t2.tolist() == [5, 6, 7]


def test_ip_noise_gamma_perturbs_input_not_target(eps_sched):
    latents = torch.randn(2, 4, 8, 8)
    args = ns(ip_noise_gamma=0.1)
    noise, noisy, t = noise_lib.get_noise_noisy_latents_and_timesteps(args, eps_sched, latents, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(latents.shape, generator=g)
    torch.testing.assert_close(noise, base)  # the target noise is unperturbed
    t_expected = torch.randint(0, 1000, (2,), generator=g)
    assert torch.equal(t, t_expected)
    perturb = torch.randn(latents.shape, generator=g)
    torch.testing.assert_close(noisy, eps_sched.add_noise(latents, base + 0.1 * perturb, t))


def test_check_noise_and_loss_args(caplog):
    loss_lib.check_noise_and_loss_args(ns(noise_offset=0.05, min_snr_gamma=5), v_prediction=False)
    with pytest.raises(TrainingSetupError, match="--adaptive_noise_scale"):
        loss_lib.check_noise_and_loss_args(ns(adaptive_noise_scale=0.1), v_prediction=False)
    # a GUI config's noise_offset = 0 beside adaptive_noise_scale: accepted with a warning, as sd-scripts accepts it
    with caplog.at_level("WARNING"):
        loss_lib.check_noise_and_loss_args(ns(adaptive_noise_scale=0.1, noise_offset=0.0), v_prediction=False)
        loss_lib.check_noise_and_loss_args(ns(adaptive_noise_scale=0.0, noise_offset=0.0), v_prediction=False)
    assert caplog.messages == ["--adaptive_noise_scale 0.1 has no effect with --noise_offset 0 (the offset is off)"]
    loss_lib.check_noise_and_loss_args(ns(noise_offset=0.1, multires_noise_iterations=6), v_prediction=False)  # allowed
    with pytest.raises(TrainingSetupError, match="--scale_v_pred_loss_like_noise_pred"):
        loss_lib.check_noise_and_loss_args(ns(scale_v_pred_loss_like_noise_pred=True), v_prediction=False)
    with pytest.raises(TrainingSetupError, match="--v_pred_like_loss"):
        loss_lib.check_noise_and_loss_args(ns(v_pred_like_loss=0.1), v_prediction=True)
    with pytest.raises(TrainingSetupError, match="--min_timestep"):
        loss_lib.check_noise_and_loss_args(ns(min_timestep=500, max_timestep=100), v_prediction=False)
    with pytest.raises(TrainingSetupError, match="--loss_type"):
        loss_lib.check_noise_and_loss_args(ns(loss_type="l3"), v_prediction=False)
    with pytest.raises(TrainingSetupError, match=r"--huber_c must be above 0 for --loss_type huber, got 0.0"):
        loss_lib.check_noise_and_loss_args(ns(loss_type="huber", huber_schedule="exponential", huber_c=0.0),
                                           v_prediction=False)  # math domain error in log(0) before


# ---------------------------------------------------------------------------------------------------------------
# per-sample losses
# ---------------------------------------------------------------------------------------------------------------


def test_per_sample_loss_hand_computed():
    pred = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 3.0]]]])  # (2,1,1,2)
    target = torch.zeros_like(pred)
    l2 = loss_lib.per_sample_loss(pred, target, "l2")
    assert l2.shape == (2,) and l2.dtype == torch.float32
    assert l2.tolist() == pytest.approx([(1 + 4) / 2, (0.25 + 9) / 2])
    assert loss_lib.per_sample_loss(pred, target, "l1").tolist() == pytest.approx([1.5, 1.75])

    def huber(d, c):
        return 2 * c * (math.sqrt(d * d + c * c) - c)

    got = loss_lib.per_sample_loss(pred, target, "huber", huber_c=1.0)
    assert got.tolist() == pytest.approx([(huber(1, 1) + huber(2, 1)) / 2, (huber(0.5, 1) + huber(3, 1)) / 2])
    got = loss_lib.per_sample_loss(pred, target, "smooth_l1", huber_c=0.5)
    assert got.tolist() == pytest.approx(
        [(huber(1, 0.5) + huber(2, 0.5)) / 2 / 0.5, (huber(0.5, 0.5) + huber(3, 0.5)) / 2 / 0.5])
    # per-sample huber_c
    got = loss_lib.per_sample_loss(pred, target, "huber", huber_c=torch.tensor([1.0, 0.1]))
    assert got.tolist() == pytest.approx([(huber(1, 1) + huber(2, 1)) / 2, (huber(0.5, 0.1) + huber(3, 0.1)) / 2])
    # half precision inputs give a float32 result; a mask weights elements before the mean
    assert loss_lib.per_sample_loss(pred.half(), target.half()).dtype == torch.float32
    mask = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])
    assert loss_lib.per_sample_loss(pred, target, "l2", mask=mask).tolist() == pytest.approx([0.5, 4.5])
    with pytest.raises(TrainingSetupError, match="--loss_type"):
        loss_lib.per_sample_loss(pred, target, "l3")


def test_mask_is_area_averaged_to_the_latent_size():
    """An alpha / loss mask at image size is shrunk to the latent grid by area averaging (sd-scripts
    apply_masked_loss), so a latent pixel is weighted by the share of its 8x8 image block that is masked in;
    picking one pixel per block would drop or fully keep partly transparent edges."""
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1,1,2,2); l2 loss per latent pixel: 1, 4, 9, 16
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[1.0, 0.0, 1.0, 1.0],
                          [0.0, 0.0, 1.0, 1.0],
                          [0.0, 1.0, 0.0, 0.0],
                          [1.0, 1.0, 0.0, 0.0]]])  # (1,4,4): its 2x2 blocks average to 0.25, 1, 0.75, 0
    want = (1 * 0.25 + 4 * 1.0 + 9 * 0.75 + 16 * 0.0) / 4  # 2.75
    assert loss_lib.per_sample_loss(pred, target, "l2", mask=mask).tolist() == pytest.approx([want])
    assert loss_lib.per_sample_loss(pred, target, "l2", mask=mask.unsqueeze(1)).tolist() == pytest.approx([want])


def test_huber_c_schedules(eps_sched):
    t = torch.tensor([0, 500, 1000 - 1])
    assert loss_lib.get_huber_c(ns(loss_type="l2"), t, eps_sched) is None
    const = loss_lib.get_huber_c(ns(loss_type="huber", huber_schedule="constant", huber_c=0.2, huber_scale=2.0), t, eps_sched)
    assert const.tolist() == pytest.approx([0.4] * 3)
    exp = loss_lib.get_huber_c(ns(loss_type="huber", huber_schedule="exponential", huber_c=0.1, huber_scale=1.0),
                         torch.tensor([0, 1000]), eps_sched)
    assert exp.tolist() == pytest.approx([1.0, 0.1])
    snr = loss_lib.get_huber_c(ns(loss_type="smooth_l1", huber_c=0.1), t, eps_sched)  # default schedule: snr
    ac = eps_sched.alphas_cumprod[t].double()
    sigma = ((1 - ac) / ac).sqrt()
    assert snr.tolist() == pytest.approx(((1 - 0.1) / (1 + sigma) ** 2 + 0.1).tolist(), rel=1e-5)


def test_huber_c_snr_schedule_ignores_huber_scale(eps_sched):
    """With the default snr schedule huber_c is (1-c)/(1+σ_t)² + c whatever --huber_scale is (sd-scripts applies the
    scale to the constant and exponential schedules only): a GUI config that writes huber_scale keeps the loss."""
    t = torch.tensor([0, 500, 999])
    ac = eps_sched.alphas_cumprod[t].double()
    sigma = ((1 - ac) / ac).sqrt()
    want = ((1 - 0.1) / (1 + sigma) ** 2 + 0.1).tolist()
    for scale in (1.0, 3.0):
        got = loss_lib.get_huber_c(ns(loss_type="huber", huber_schedule="snr", huber_c=0.1, huber_scale=scale), t,
                                   eps_sched)
        assert got.tolist() == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------------------------------------------


def params():
    return [torch.nn.Parameter(torch.zeros(3))]


def test_adamw_default_and_description():
    name, opt = optim_lib.get_optimizer(ns(learning_rate=1e-4), params())
    assert name == "torch.optim.adamw.AdamW" and isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 1e-4
    name, opt = optim_lib.get_optimizer(ns(optimizer_type="AdamW", learning_rate=1e-4,
                                    optimizer_args=["weight_decay=0.01", "betas=0.9,0.99"]), params())
    assert name == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))"
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[0]["betas"] == (0.9, 0.99)


def test_param_groups_keep_their_lr():
    groups = [{"params": params(), "lr": 5e-5}, {"params": params(), "lr": 5e-6}]
    _, opt = optim_lib.get_optimizer(ns(learning_rate=1e-4, optimizer_type="adamw"), groups)
    assert [g["lr"] for g in opt.param_groups] == [5e-5, 5e-6]


def test_adamw_fused_only_on_cuda_and_not_over_user_args(monkeypatch):
    """Issue 6: AdamW is fused (one kernel per step) when every parameter is on CUDA; never on the CPU, never when
    --optimizer_args names fused or foreach; the ss_optimizer description does not change."""
    name, opt = optim_lib.get_optimizer(ns(learning_rate=1e-4), params())  # CPU tensors
    assert not opt.defaults["fused"] and name == "torch.optim.adamw.AdamW"
    assert not optim_lib._all_on_cuda([{"params": (p for p in params())}])  # a generator is not consumed to check
    monkeypatch.setattr(optim_lib, "_all_on_cuda", lambda ps: True)  # fused AdamW also runs on the CPU in torch >= 2.4
    name, opt = optim_lib.get_optimizer(ns(learning_rate=1e-4), params())
    assert opt.defaults["fused"] is True and name == "torch.optim.adamw.AdamW"
    name, opt = optim_lib.get_optimizer(ns(learning_rate=1e-4, optimizer_args=["foreach=True"]), params())
    assert not opt.defaults["fused"] and opt.defaults["foreach"] is True and name == "torch.optim.adamw.AdamW(foreach=True)"
    name, opt = optim_lib.get_optimizer(ns(learning_rate=1e-4, optimizer_args=["fused=False"]), params())
    assert opt.defaults["fused"] is False


def test_sgd_nesterov():
    name, opt = optim_lib.get_optimizer(ns(optimizer_type="SGDNesterov", learning_rate=0.1), params())
    assert name == "torch.optim.sgd.SGD(momentum=0.9)"
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9


def test_adafactor_relative_step_switches_schedule():
    args = ns(optimizer_type="Adafactor", learning_rate=1e-3, lr_scheduler="constant")
    name, opt = optim_lib.get_optimizer(args, params())
    assert name == "transformers.optimization.Adafactor(relative_step=True)"
    assert args.lr_scheduler == "adafactor:0.001"
    sched = optim_lib.get_lr_scheduler(args, opt, 100)
    assert type(sched).__name__ == "AdafactorSchedule"
    args = ns(optimizer_type="Adafactor", learning_rate=1e-3, lr_scheduler="constant_with_warmup",
              optimizer_args=["relative_step=False", "scale_parameter=False"])
    name, opt = optim_lib.get_optimizer(args, params())
    assert name == "transformers.optimization.Adafactor(relative_step=False,scale_parameter=False)"
    assert opt.param_groups[0]["lr"] == 1e-3 and args.lr_scheduler == "constant_with_warmup"
    # relative_step: the metadata says the learning rates were not used (sd-scripts sets them to None)
    args = ns(optimizer_type="Adafactor", learning_rate=1e-3, unet_lr=1e-4, text_encoder_lr=5e-5)
    optim_lib.get_optimizer(args, [{"params": params(), "lr": 1e-4}])
    assert args.learning_rate is None and args.unet_lr is None and args.text_encoder_lr is None


def _fake_package(monkeypatch, module_name: str, class_name: str, base=torch.optim.SGD):
    """An optional optimizer package that is not installed here, stood in by a subclass of a torch optimizer."""
    import types

    module = types.ModuleType(module_name)
    cls = type(class_name, (base,), {"__module__": module_name})
    setattr(module, class_name, cls)
    parts = module_name.split(".")
    for i in range(1, len(parts)):  # parents too, so that import_module finds the dotted name
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), sys.modules.get(".".join(parts[:i]),
                                                                                types.ModuleType(".".join(parts[:i]))))
    monkeypatch.setitem(sys.modules, module_name, module)
    return cls


@pytest.mark.parametrize("name, module, cls_name", [
    ("Prodigy", "prodigyopt", "Prodigy"), ("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint"),
    ("DAdaptAdam", "dadaptation", "DAdaptAdam"), ("Lion", "lion_pytorch", "Lion"),
    ("PagedAdamW8bit", "bitsandbytes.optim", "PagedAdamW8bit"), ("AdamWScheduleFree", "schedulefree", "AdamWScheduleFree"),
])
def test_sd_scripts_optimizer_names_build_the_installed_package(monkeypatch, caplog, name, module, cls_name):
    """sd-scripts' names for optimizers of optional packages build that package's class when it is installed
    (`ss_optimizer` names it as sd-scripts does), and say what to install when it is not."""
    cls = _fake_package(monkeypatch, module, cls_name, base=torch.optim.Adam)
    described, opt = optim_lib.get_optimizer(ns(optimizer_type=name, learning_rate=1.0,
                                                optimizer_args=["weight_decay=0.01"]), params())
    assert type(opt) is cls and described == f"{module}.{cls_name}(weight_decay=0.01)"
    monkeypatch.setitem(sys.modules, module, None)  # not installed: import fails
    with pytest.raises(TrainingSetupError, match=f"--optimizer_type {name} uses {module}.{cls_name}, whose package "
                                                 "is not installed"):
        optim_lib.get_optimizer(ns(optimizer_type=name, learning_rate=1.0), params())


def test_learning_rate_free_optimizers_warn_as_sd_scripts_does(monkeypatch, caplog):
    _fake_package(monkeypatch, "prodigyopt", "Prodigy")
    with caplog.at_level("WARNING"):
        optim_lib.get_optimizer(ns(optimizer_type="Prodigy", learning_rate=1e-4), params())
        optim_lib.get_optimizer(ns(optimizer_type="Prodigy", learning_rate=1.0),
                                [{"params": params(), "lr": 1.0}, {"params": params(), "lr": 0.5}])
    assert "expects a learning rate around 1.0 (got 0.0001)" in caplog.text
    assert "several learning rates ([0.5, 1.0]) share one step-size estimate" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # the groups' rate counts, not --learning_rate (--unet_lr 1 --text_encoder_lr 1)
        optim_lib.get_optimizer(ns(optimizer_type="Prodigy", learning_rate=1e-4), [{"params": params(), "lr": 1.0}])
    assert "expects a learning rate" not in caplog.text
    _fake_package(monkeypatch, "bitsandbytes.optim", "SGD8bit")
    _, opt = optim_lib.get_optimizer(ns(optimizer_type="SGDNesterov8bit", learning_rate=0.1), params())
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9


def test_schedule_free_optimizers_schedule_themselves_and_switch_weights(monkeypatch, caplog):
    """A schedule-free optimizer gets a do-nothing schedule (a warning if one was asked for), and
    `evaluation_weights` switches it to the weights it evaluates and back; other optimizers are left alone."""
    modes = []

    class FakeScheduleFree(torch.optim.SGD):
        def train(self):
            modes.append("train")

        def eval(self):
            modes.append("eval")

    opt = FakeScheduleFree(params(), lr=0.5)
    assert optim_lib.is_schedule_free(opt) and not optim_lib.is_schedule_free(torch.optim.SGD(params(), lr=1))
    with caplog.at_level("WARNING"):
        sched = optim_lib.get_lr_scheduler(ns(lr_scheduler="cosine", lr_warmup_steps=5), opt, 10)
    assert "sets its learning rate itself" in caplog.text
    assert _lrs(sched, [0, 5, 9]) == [0.5, 0.5, 0.5]
    with optim_lib.evaluation_weights(opt):
        assert modes == ["eval"]
    assert modes == ["eval", "train"]
    with optim_lib.evaluation_weights(torch.optim.SGD(params(), lr=1)):
        pass
    assert modes == ["eval", "train"]
    with pytest.raises(RuntimeError), optim_lib.evaluation_weights(opt):  # a failed save still switches back
        raise RuntimeError("disk full")
    assert modes == ["eval", "train", "eval", "train"]


def test_torch_and_module_path_optimizers():
    name, opt = optim_lib.get_optimizer(ns(optimizer_type="RAdam", learning_rate=1e-3), params())
    assert isinstance(opt, torch.optim.RAdam) and name == "torch.optim.radam.RAdam"
    name, opt = optim_lib.get_optimizer(ns(optimizer_type="torch.optim.Adam", learning_rate=1e-3), params())
    assert isinstance(opt, torch.optim.Adam)


def test_adamw8bit_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    expected = ("--optimizer_type AdamW8bit needs bitsandbytes, a GPU extra: pip install -r requirements-gpu.txt, "
                "or use --optimizer_type AdamW")
    with pytest.raises(TrainingSetupError) as e:
        optim_lib.get_optimizer(ns(optimizer_type="AdamW8bit", learning_rate=1e-4), params())
    assert str(e.value) == expected
    with pytest.raises(TrainingSetupError) as e:
        optim_lib.get_optimizer(ns(use_8bit_adam=True, optimizer_type="AdamW", learning_rate=1e-4), params())
    assert str(e.value) == expected
    with pytest.raises(TrainingSetupError, match="disagree"):
        optim_lib.get_optimizer(ns(use_8bit_adam=True, optimizer_type="SGDNesterov", learning_rate=1e-4), params())


def test_optimizer_errors():
    with pytest.raises(TrainingSetupError, match="AdamW, AdamW8bit, SGDNesterov, Adafactor"):
        optim_lib.get_optimizer(ns(optimizer_type="AdamX", learning_rate=1e-4), params())
    with pytest.raises(TrainingSetupError, match="did you mean RAdam"):
        optim_lib.get_optimizer(ns(optimizer_type="radam", learning_rate=1e-4), params())
    with pytest.raises(TrainingSetupError, match="prodigyopt.Prodigy.*pip install prodigyopt"):
        optim_lib.get_optimizer(ns(optimizer_type="Prodigy", learning_rate=1.0), params())  # not installed here
    with pytest.raises(TrainingSetupError, match="no_such_pkg"):
        optim_lib.get_optimizer(ns(optimizer_type="no_such_pkg.Opt", learning_rate=1.0), params())
    with pytest.raises(TrainingSetupError, match="key=value"):
        optim_lib.get_optimizer(ns(learning_rate=1e-4, optimizer_args=["weight_decay"]), params())
    with pytest.raises(TrainingSetupError, match="quotes"):
        optim_lib.get_optimizer(ns(learning_rate=1e-4, optimizer_args=["foo=bar baz"]), params())
    with pytest.raises(TrainingSetupError, match="--optimizer_args"):
        optim_lib.get_optimizer(ns(learning_rate=1e-4, optimizer_args=["weight_decayy=0.1"]), params())
    # the legacy spelling of --optimizer_type Lion asks for lion-pytorch like the new one (not installed here)
    with pytest.raises(TrainingSetupError, match="lion_pytorch.Lion.*pip install lion-pytorch"):
        optim_lib.get_optimizer(ns(use_lion_optimizer=True, learning_rate=1e-4), params())
    with pytest.raises(TrainingSetupError, match="--use_lion_optimizer and --optimizer_type SGDNesterov disagree"):
        optim_lib.get_optimizer(ns(use_lion_optimizer=True, optimizer_type="SGDNesterov", learning_rate=1e-4), params())


# ---------------------------------------------------------------------------------------------------------------
# learning-rate schedules
# ---------------------------------------------------------------------------------------------------------------


def lr_at(args, step, total=110, num_processes=1, lr=1.0):
    _, opt = optim_lib.get_optimizer(ns(learning_rate=lr), params())
    sched = optim_lib.get_lr_scheduler(args, opt, total, num_processes)
    return sched.lr_lambdas[0](step) * lr


@pytest.mark.parametrize(
    "name,extra,expected",
    [
        ("constant_with_warmup", {}, {0: 0.0, 5: 0.5, 10: 1.0, 100: 1.0}),
        ("linear", {}, {5: 0.5, 10: 1.0, 60: 0.5, 110: 0.0}),
        ("cosine", {}, {5: 0.5, 35: 0.5 * (1 + math.cos(math.pi * 0.25)), 60: 0.5, 110: 0.0}),
        ("cosine_with_restarts", {"lr_scheduler_num_cycles": 2}, {5: 0.5, 35: 0.5, 60: 1.0, 85: 0.5}),
        ("polynomial", {"lr_scheduler_power": 2.0}, {5: 0.5, 60: (1 - 1e-7) * 0.25 + 1e-7, 110: 1e-7}),
    ],
)
def test_scheduler_values_with_warmup(name, extra, expected):
    # 110 steps, 10 warmup: after warmup, progress = (step - 10) / 100
    args = ns(lr_scheduler=name, lr_warmup_steps=10, **extra)
    for step, want in expected.items():
        assert lr_at(args, step) == pytest.approx(want, abs=1e-9), (name, step)


def test_constant_scheduler_and_warmup_error():
    assert lr_at(ns(lr_scheduler="constant", lr_warmup_steps=0), 50) == 1.0
    with pytest.raises(TrainingSetupError, match="constant_with_warmup"):
        lr_at(ns(lr_scheduler="constant", lr_warmup_steps=10), 5)


def test_warmup_forms():
    for form in ("10%", 0.1, 20, "20", "0.1"):
        args = ns(lr_scheduler="linear", lr_warmup_steps=form)
        assert lr_at(args, 10, total=200) == pytest.approx(0.5), form  # 20 warmup steps of 200
    assert optim_lib.resolve_warmup_steps("10%", 200) == 20
    assert optim_lib.resolve_warmup_steps(0.1, 200) == 20
    # 100% (or a TOML float 1.0) warms up over the whole run, as sd-scripts (it was 1 step)
    assert optim_lib.resolve_warmup_steps("100%", 200) == optim_lib.resolve_warmup_steps(1.0, 200) == 200
    assert lr_at(ns(lr_scheduler="linear", lr_warmup_steps="100%"), 100, total=200) == pytest.approx(0.5)
    assert optim_lib.resolve_warmup_steps(1, 200) == 1  # an int is a step count
    assert optim_lib.int_or_float("1.0") == 1.0 and optim_lib.int_or_float("1") == 1  # the command line alike
    assert optim_lib.resolve_warmup_steps(optim_lib.int_or_float("1.0"), 200) == 200
    assert optim_lib.int_or_float("10%") == 0.1 and optim_lib.int_or_float("100") == 100 and optim_lib.int_or_float("0.05") == 0.05
    with pytest.raises(TrainingSetupError, match="--lr_warmup_steps"):
        optim_lib.resolve_warmup_steps(1.5, 200)
    with pytest.raises(TrainingSetupError, match="--lr_warmup_steps"):
        optim_lib.resolve_warmup_steps("ten", 200)
    with pytest.raises(TrainingSetupError, match="--lr_warmup_steps"):  # it read as 2.0, i.e. 2 steps
        optim_lib.resolve_warmup_steps("200%", 200)


def test_optimizer_and_schedule_messages_as_sd_scripts_users_need_them(caplog):
    """Found by an optimizer review: --use_8bit_adam beside another optimizer trained AdamW8bit silently (sd-scripts
    refuses it); advice to quote false switched the option on; sd-scripts' optional optimizers were missing from
    the unknown-name error; piecewise_constant with a warmup stopped a run sd-scripts trains (it ignores the
    warmup); Adafactor replaced the schedule without a word and then advised the schedule it had replaced."""
    from library.args_check import _aliases

    for extra, other in ((dict(optimizer_type="Prodigy"), "--optimizer_type Prodigy"),
                         (dict(optimizer_type="AdamW", use_lion_optimizer=True), "--use_lion_optimizer")):
        args = ns(use_8bit_adam=True, caption_extention=None, text_encoder_lr=None, **extra)
        with pytest.raises(TrainingSetupError, match=f"--use_8bit_adam and {other} disagree"):
            _aliases(args)
    args = ns(use_8bit_adam=True, optimizer_type="AdamW", caption_extention=None, text_encoder_lr=None)
    _aliases(args)
    assert args.optimizer_type == "AdamW8bit"

    with pytest.raises(TrainingSetupError, match="capitalised: use_bias_correction=False"):
        optim_lib.parse_kv_args(["use_bias_correction=false"], "--optimizer_args")
    with pytest.raises(TrainingSetupError, match="strings need quotes: mode='fast'"):
        optim_lib.parse_kv_args(["mode=fast"], "--optimizer_args")

    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(TrainingSetupError, match=r"did you mean Prodigy\?.*DAdaptAdam"):
        optim_lib.get_optimizer(ns(optimizer_type="Prodigyy", learning_rate=1.0), params)

    opt = torch.optim.SGD(params, lr=1.0)
    with caplog.at_level(logging.WARNING):
        sched = optim_lib.get_lr_scheduler(ns(lr_scheduler="piecewise_constant", lr_warmup_steps=2,
                                              lr_scheduler_args=["step_rules='1:2,0.1'"]), opt, 10)
    assert "ignores --lr_warmup_steps 2" in caplog.text
    lrs = []
    for _ in range(3):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == [1.0, 1.0, 0.1]  # step_rules: x1 before step 2, then x0.1; the warmup left out

    caplog.clear()
    args = ns(optimizer_type="Adafactor", learning_rate=1e-3, lr_scheduler="cosine", lr_warmup_steps=2)
    with caplog.at_level(logging.INFO):
        _, opt = optim_lib.get_optimizer(args, [torch.nn.Parameter(torch.zeros(2))])
    assert "--lr_scheduler cosine is replaced by adafactor:0.001" in caplog.text
    with pytest.raises(TrainingSetupError, match="relative_step=False scale_parameter=False warmup_init=False"):
        optim_lib.get_lr_scheduler(args, opt, 10)


def test_num_processes_scales_steps():
    # the scheduler is stepped num_processes times per optimizer step
    for warmup in (10, 0.1):
        args = ns(lr_scheduler="cosine", lr_warmup_steps=warmup)
        for step in (5, 35, 60):
            single = lr_at(args, step, total=110 if warmup == 10 else 100)
            double = lr_at(args, 2 * step, total=110 if warmup == 10 else 100, num_processes=2)
            assert double == pytest.approx(single), (warmup, step)


def test_schedule_step_counts_round_and_scale_as_sd_scripts():
    """The step counts behind a schedule, each checked where it changes the learning rate a user trains with:
    a fractional --lr_warmup_steps is floored (sd-scripts' int(ratio * steps)); a ratio of 1.0 ("100%") is the whole
    run also with 2 processes (not twice it); inverse_sqrt's --lr_scheduler_timescale and warmup_stable_decay's
    --lr_scheduler_min_lr_ratio reach transformers' schedules."""
    # 0.15 of 110 steps = 16.5 -> 16 warmup steps: half the rate at step 8
    assert optim_lib.resolve_warmup_steps(0.15, 110) == 16
    assert lr_at(ns(lr_scheduler="linear", lr_warmup_steps=0.15), 8) == pytest.approx(8 / 16)
    # 100 optimizer steps on 2 processes: 200 scheduler steps, all of them warmup; halfway (100) is half the rate
    for form in (1.0, "100%"):
        args = ns(lr_scheduler="linear", lr_warmup_steps=form)
        assert lr_at(args, 100, total=100, num_processes=2) == pytest.approx(0.5), form
    # inverse_sqrt, timescale 4, stepped twice per optimizer step: at scheduler step 2t the rate of step t,
    # 1 / sqrt((t + 4) / 4)
    args = ns(lr_scheduler="inverse_sqrt", lr_scheduler_timescale=4, lr_warmup_steps=0)
    for t in (1, 5, 12):
        assert lr_at(args, 2 * t, total=20, num_processes=2) == pytest.approx(1 / math.sqrt((t + 4) / 4)), t
    # inverse_sqrt with a warmup of 2 (timescale 4): t / 2 up to 2, then 1 / sqrt((t - 2 + 4) / 4)
    args = ns(lr_scheduler="inverse_sqrt", lr_scheduler_timescale=4, lr_warmup_steps=2)
    for t, want in ((1, 0.5), (2, 1.0), (6, 1 / math.sqrt(2))):
        assert lr_at(args, t, total=10) == pytest.approx(want), t
    # warmup_stable_decay, 10 steps, decay 4 (steps 6..9) by a half-cosine down to the floor 0.2:
    # 0.2 + 0.8 * 0.5 * (1 + cos(pi * (t - 6) / 4))
    args = ns(lr_scheduler="warmup_stable_decay", lr_warmup_steps=0, lr_decay_steps=4, lr_scheduler_min_lr_ratio=0.2)
    for t in (5, 6, 8, 9):
        want = 1.0 if t < 6 else 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (t - 6) / 4))
        assert lr_at(args, t, total=10) == pytest.approx(want, abs=1e-9), t


def _lrs(sched, steps):
    """The schedule's lr (factor of lr 1.0) at each of `steps` (the scheduler stepped there)."""
    out = []
    for _ in range(max(steps) + 1):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return [out[i] for i in steps]


@pytest.mark.parametrize("name,extra,expected", [
    # 10 steps. floor 0.1, one half-cosine: 0.1 + 0.9 · ½(1 + cos(π t / 10))
    ("cosine_with_min_lr", {"lr_scheduler_min_lr_ratio": 0.1},
     {t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in (0, 3, 5, 9)}),
    # warmup 2, decay 4 (40%), stable 4 in between, decayed by a half-cosine to the floor 0
    ("warmup_stable_decay", {"lr_warmup_steps": 2, "lr_decay_steps": "40%"},
     {0: 0.0, 1: 0.5, 2: 1.0, 5: 1.0, 6: 1.0, 7: 0.5 * (1 + math.cos(math.pi * 1 / 4)), 8: 0.5, 9: 0.5 * (1 + math.cos(math.pi * 3 / 4))}),
    # no warmup, timescale 4: 1 / √((t + 4) / 4)
    ("inverse_sqrt", {"lr_scheduler_timescale": 4}, {t: 1 / math.sqrt((t + 4) / 4) for t in (0, 1, 5, 9)}),
    # rules "factor:until,...,last": 1 before step 2, 0.5 before 4, then 0.1
    ("piecewise_constant", {"lr_scheduler_args": ['step_rules="1:2,0.5:4,0.1"']}, {0: 1.0, 1: 1.0, 2: 0.5, 3: 0.5, 4: 0.1, 9: 0.1}),
])
def test_more_sd_scripts_schedules(name, extra, expected):
    _, opt = optim_lib.get_optimizer(ns(learning_rate=1.0), params())
    sched = optim_lib.get_lr_scheduler(ns(lr_scheduler=name, **{"lr_warmup_steps": 0, **extra}), opt, 10)
    assert _lrs(sched, list(expected)) == pytest.approx(list(expected.values()), abs=1e-9)


def test_custom_scheduler_class_and_schedule_errors():
    _, opt = optim_lib.get_optimizer(ns(learning_rate=1.0), params())
    sched = optim_lib.get_lr_scheduler(ns(lr_scheduler_type="LinearLR",
                                          lr_scheduler_args=["start_factor=0.5", "total_iters=2"]), opt, 10)
    assert _lrs(sched, [0, 1, 2, 5]) == pytest.approx([0.5, 0.75, 1.0, 1.0])
    # as sd-scripts: no --lr_decay_steps is a decay of 0 (warmup, then the full rate to the end) ...
    _, opt = optim_lib.get_optimizer(ns(learning_rate=1.0), params())
    sched = optim_lib.get_lr_scheduler(ns(lr_scheduler="warmup_stable_decay", lr_warmup_steps=2), opt, 10)
    assert _lrs(sched, [0, 1, 2, 9]) == pytest.approx([0.0, 0.5, 1.0, 1.0])
    # ... and cosine_with_min_lr takes transformers' min_lr from --lr_scheduler_args
    _, opt = optim_lib.get_optimizer(ns(learning_rate=1.0), params())
    sched = optim_lib.get_lr_scheduler(ns(lr_scheduler="cosine_with_min_lr", lr_warmup_steps=0,
                                          lr_scheduler_args=["min_lr=0.1"]), opt, 10)
    assert _lrs(sched, [0, 5, 9]) == pytest.approx([1.0, 0.55, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9))])
    for kw, message in (({"lr_scheduler": "cosine_with_min_lr"}, "needs --lr_scheduler_min_lr_ratio"),
                        ({"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 6, "lr_decay_steps": 5},
                         "got warmup 6, decay 5"),
                        ({"lr_scheduler_type": "LinearLR", "lr_warmup_steps": 3},
                         "would not be used: drop it"),
                        ({"lr_scheduler_type": "NoSuchLR"}, "not a torch.optim.lr_scheduler class")):
        _, opt = optim_lib.get_optimizer(ns(learning_rate=1.0), params())
        with pytest.raises(TrainingSetupError, match=message):
            optim_lib.get_lr_scheduler(ns(**{"lr_warmup_steps": 0, **kw}), opt, 10)


def test_unknown_scheduler():
    with pytest.raises(TrainingSetupError, match="did you mean cosine"):
        lr_at(ns(lr_scheduler="cosin"), 1)


# ---------------------------------------------------------------------------------------------------------------
# names and dtypes
# ---------------------------------------------------------------------------------------------------------------


def test_ckpt_and_state_names():
    assert tu.ckpt_name("last") == "last.safetensors"
    assert tu.ckpt_name(None) == "last.safetensors"
    assert tu.ckpt_name("x", epoch=3) == "x-000003.safetensors"
    assert tu.ckpt_name("x", ".safetensors", step=120) == "x-step00000120.safetensors"
    assert tu.ckpt_name("x", "ckpt", epoch=1) == "x-000001.ckpt"
    assert tu.ckpt_name(None, epoch=3) == "epoch-000003.safetensors"  # sd-scripts' default names
    assert tu.ckpt_name(None, step=120) == "at-step00000120.safetensors"
    assert tu.state_dir_name("x", epoch=3) == "x-000003-state"
    assert tu.state_dir_name("x", step=120) == "x-step00000120-state"
    assert tu.state_dir_name("x") == "x-state"
    assert tu.state_dir_name(None) == "last-state"


def test_dtypes():
    assert tu.save_dtype(ns()) == torch.float32
    assert tu.save_dtype(ns(save_precision="fp16")) == torch.float16
    assert tu.save_dtype(ns(save_precision="bf16")) == torch.bfloat16
    assert tu.save_dtype(ns(save_precision="float")) == torch.float32
    assert tu.save_dtype(ns(full_bf16=True)) == torch.bfloat16
    assert tu.weight_dtype("no") == torch.float32 and tu.weight_dtype(None) == torch.float32
    assert tu.weight_dtype("fp16") == torch.float16 and tu.weight_dtype("bf16") == torch.bfloat16
    with pytest.raises(TrainingSetupError, match="--save_precision"):
        tu.save_dtype(ns(save_precision="fp8"))


# ---------------------------------------------------------------------------------------------------------------
# --config_file
# ---------------------------------------------------------------------------------------------------------------


def make_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--pretrained_model_name_or_path", type=str, required=True)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--max_train_steps", type=int, default=1600)
    p.add_argument("--output_name", type=str, default=None)
    p.add_argument("--resolution", type=str, default=None)
    p.add_argument("--network_args", type=str, nargs="*", default=None)
    p.add_argument("--text_encoder_lr", type=float, nargs="*", default=None)
    p.add_argument("--cache_latents", action="store_true")
    p.add_argument("--mixed_precision", type=str, choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--lr_warmup_steps", type=optim_lib.int_or_float, default=0)
    p.add_argument("--wandb_api_key", type=str, default=None)
    p.add_argument("--config_file", type=str, default=None)
    p.add_argument("--output_config", action="store_true")
    return p


def load(tmp_path, text, argv_extra=(), name="cfg"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    parser = make_parser()
    argv = ["--config_file", str(tmp_path / name), *argv_extra]  # .toml is appended
    if "pretrained" not in text:
        argv += ["--pretrained_model_name_or_path", "x"]
    return cf.parse_args_with_config(parser, argv)


CONFIG = """
[model]
pretrained_model_name_or_path = "/models/sd15.safetensors"

[training]
learning_rate = 3e-4
max_train_steps = 500
lr_warmup_steps = "10%"
text_encoder_lr = 5e-5

[training.deeper.still]
cache_latents = true
network_args = ["conv_dim=4", "conv_alpha=1"]
"""


def test_config_precedence_and_flattening(tmp_path):
    args = load(tmp_path, CONFIG, ["--max_train_steps", "42"])
    assert args.max_train_steps == 42  # CLI beats TOML
    assert args.learning_rate == 3e-4  # TOML beats default
    assert args.pretrained_model_name_or_path == "/models/sd15.safetensors"  # required arg satisfied by TOML
    assert args.mixed_precision == "no" and args.output_name is None  # defaults
    assert args.cache_latents is True and args.network_args == ["conv_dim=4", "conv_alpha=1"]  # nested tables
    assert args.lr_warmup_steps == 0.1  # string through the argument's converter
    assert args.text_encoder_lr == [5e-5]  # a scalar for a list argument
    assert cf.read_config_file(argparse.Namespace(config_file=None), make_parser(), []).config_file is None


def test_config_unknown_key_suggests(tmp_path):
    with pytest.raises(TrainingSetupError) as e:
        load(tmp_path, "[training]\nlearning_rat = 1e-4\n")
    msg = str(e.value)
    assert "training.learning_rat" in msg and "did you mean learning_rate" in msg and "cfg.toml" in msg


def test_config_syntax_error_names_line(tmp_path):
    with pytest.raises(TrainingSetupError) as e:
        load(tmp_path, "[training]\nlearning_rate = 1e-4\nmax_train_steps = = 3\n")
    msg = str(e.value)
    assert "line 3" in msg and "cfg.toml:3:" in msg and msg.startswith("--config_file")
    assert "max_train_steps = = 3" in msg  # the line is shown (the one TOML reader, config_util.load_toml)
    with pytest.raises(TrainingSetupError, match="--config_file .*nope.toml: file not found"):
        cf.read_config_file(argparse.Namespace(config_file=str(tmp_path / "nope")), make_parser(), [])


def test_config_type_errors(tmp_path):
    with pytest.raises(TrainingSetupError, match="max_train_steps must be an integer"):
        load(tmp_path, 'max_train_steps = "100"\n')
    with pytest.raises(TrainingSetupError, match="learning_rate must be a number"):
        load(tmp_path, 'learning_rate = "1e-4"\n')
    with pytest.raises(TrainingSetupError, match="cache_latents is a switch"):
        load(tmp_path, 'cache_latents = "yes"\n')
    with pytest.raises(TrainingSetupError, match="not one of no, fp16, bf16"):
        load(tmp_path, 'mixed_precision = "fp32"\n')
    with pytest.raises(TrainingSetupError, match="set twice"):
        load(tmp_path, "[a]\nmax_train_steps = 1\n[b]\nmax_train_steps = 2\n")
    with pytest.raises(TrainingSetupError, match="not found"):
        cf.read_config_file(argparse.Namespace(config_file=str(tmp_path / "missing")), make_parser(), [])
    args = load(tmp_path, "resolution = 768\nlearning_rate = 1\n")  # numbers for str / float arguments
    assert args.resolution == "768" and isinstance(args.learning_rate, float)


def test_config_fractional_number_for_an_integer_argument_is_an_error(tmp_path):
    """`max_train_steps = 2.5` in a --config_file must not train 2 steps silently: an integer argument takes a whole
    number only (300.0 is 300), and the error names the file, the key and how to write it."""
    assert load(tmp_path, "max_train_steps = 300.0\n").max_train_steps == 300
    with pytest.raises(TrainingSetupError) as e:
        load(tmp_path, "[training]\nmax_train_steps = 2.5\n")
    assert str(e.value) == (f"--config_file {tmp_path / 'cfg.toml'}: training.max_train_steps must be an integer, "
                            "got a number 2.5; write it as max_train_steps = 100")


def test_key_value_list_arguments_written_as_one_string_are_split_like_the_command_line(tmp_path):
    """`network_args = "conv_dim=4 conv_alpha=1"` (one string, as typed on a command line) was one item, refused as
    conv_dim '4 conv_alpha=1'; sd-scripts iterated its characters. It is the two words; a string whose words are not
    all key=value (a value with a space in it) stays one item, and an array is taken as written."""
    from library.train_args import setup_parser

    def read(text):
        (tmp_path / "run.toml").write_text(text, encoding="utf-8")
        return cf.parse_args_with_config(setup_parser(), ["--config_file", str(tmp_path / "run.toml")])

    args = read('network_args = "conv_dim=4  conv_alpha=1"\noptimizer_args = "weight_decay=0.1 betas=0.9,0.99"\n')
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"]
    assert args.optimizer_args == ["weight_decay=0.1", "betas=0.9,0.99"]
    assert read('optimizer_args = "betas=(0.9, 0.99)"\n').optimizer_args == ["betas=(0.9, 0.99)"]
    assert read('network_args = ["conv_dim=4", "conv_alpha=1"]\n').network_args == ["conv_dim=4", "conv_alpha=1"]


def test_output_config_round_trip(tmp_path):
    parser = make_parser()
    argv = ["--pretrained_model_name_or_path", "m.safetensors", "--learning_rate", "2e-4", "--cache_latents",
            "--network_args", "conv_dim=4", "--output_name", 'my "lora"', "--wandb_api_key", "secret",
            "--lr_warmup_steps", "5%"]
    args = parser.parse_args(argv)
    path = cf.write_config_file(args, parser, str(tmp_path / "out"))
    text = open(path, encoding="utf-8").read()
    assert path.endswith("out.toml") and "secret" not in text and "max_train_steps" not in text
    back = cf.read_config_file(argparse.Namespace(config_file=path), parser, ["--config_file", path])
    for key in ("pretrained_model_name_or_path", "learning_rate", "cache_latents", "network_args", "output_name",
                "lr_warmup_steps", "max_train_steps"):
        assert getattr(back, key) == getattr(args, key), key
    assert back.wandb_api_key is None
    with pytest.raises(TrainingSetupError, match="already exists"):
        cf.write_config_file(args, parser, path)
    # it writes through a temp file of its own: a fixed "<path>.tmp" followed a symlink there into another file
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    os.symlink(notes, tmp_path / "second.toml.tmp")
    cf.write_config_file(args, parser, str(tmp_path / "second"))
    assert notes.read_text() == "my notes" and (tmp_path / "second.toml").read_text() == text
    assert not (tmp_path / "second.toml").is_symlink()


def test_kohya_ss_gui_config_keys(tmp_path, caplog):
    """What the kohya_ss GUI writes in every LoRA TOML that sd-scripts silently ignores (epoch, noise_offset_type,
    ...) is accepted with a note, and its int(...) switches are read as switches; they stopped the run before. Other
    unknown keys stay errors. --output_config never writes overwrite (every later run would replace outputs), and a
    value parsed from "A,B" round-trips."""
    from library import train_args

    parser = train_args.setup_parser()
    path = tmp_path / "gui.toml"
    path.write_text('pretrained_model_name_or_path = "m.safetensors"\noutput_dir = "o"\nepoch = 10\n'
                    'noise_offset_type = "Original"\nstop_text_encoder_training = 3\nlowvram = true\n'
                    'persistent_data_loader_workers = 1\ncache_latents = 0\n')
    with caplog.at_level(logging.INFO):
        args = cf.parse_args_with_config(parser, ["--config_file", str(path)])
    assert args.persistent_data_loader_workers is True and args.cache_latents is False
    assert "epoch has no effect here: the GUI's epoch count" in caplog.text
    path.write_text('pretrained_model_name_or_path = "m.safetensors"\npersistent_data_loader_workers = 2\n')
    with pytest.raises(TrainingSetupError, match="persistent_data_loader_workers is a switch"):
        cf.parse_args_with_config(parser, ["--config_file", str(path)])
    args = parser.parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--overwrite",
                              "--apt_aug_scale", "1,2"])
    out = cf.write_config_file(args, parser, str(tmp_path / "written"))
    text = open(out, encoding="utf-8").read()
    assert "overwrite" not in text and 'apt_aug_scale = "1.0,2.0"' in text
    back = cf.parse_args_with_config(parser, ["--config_file", out])
    assert back.apt_aug_scale == args.apt_aug_scale and back.overwrite is False


def test_real_parser_sd_scripts_config(tmp_path):
    """A typical sd-scripts training TOML loads through the trainer's own parser (library/train_args.py)."""
    from library import train_args
    path = tmp_path / "sdxl.toml"
    path.write_text(
        '[model_arguments]\npretrained_model_name_or_path = "/models/sdxl.safetensors"\n'
        '[additional_network_arguments]\nnetwork_dim = 32\nnetwork_alpha = 32\nnetwork_args = ["conv_dim=8"]\n'
        '[optimizer_arguments]\noptimizer_type = "AdamW8bit"\nlearning_rate = 1e-4\nlr_warmup_steps = 0.05\n'
        'optimizer_args = ["weight_decay=0.01"]\n[training_arguments]\nmax_train_steps = 2000\nmixed_precision = "bf16"\n',
        encoding="utf-8")
    parser = train_args.setup_parser()
    args = cf.parse_args_with_config(parser, ["--config_file", str(path), "--learning_rate", "2e-4"])
    assert args.learning_rate == 2e-4 and args.network_dim == 32 and args.max_train_steps == 2000
    assert args.network_alpha == 32.0 and isinstance(args.network_alpha, float)  # no int64 alpha
    assert optim_lib.resolve_warmup_steps(args.lr_warmup_steps, 2000) == 100


def test_zero_terminal_snr():
    sched = make_noise_scheduler(True)
    first = float(sched.alphas_cumprod[0])
    noise_lib.fix_noise_scheduler_betas_for_zero_terminal_snr(sched)
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(sched.alphas_cumprod[0]) == pytest.approx(first, rel=1e-5)
    w = loss_lib.apply_snr_weight(torch.ones(2), torch.tensor([0, 999]), sched, 5.0, v_prediction=False)
    assert torch.isfinite(w).all() and float(w[1]) == 1.0
    # the SNR weights keep the schedule from before the rescale, as sd-scripts' all_snr table (made before it) does;
    # by hand from the SD schedule: SNR(900) = 0.014354, SNR(999) = 0.004682 (rescaled: 0.002969 and 0)
    t = torch.tensor([900, 999])
    assert loss_lib.snr_of(sched, t).tolist() == pytest.approx([0.014354, 0.004682], rel=1e-3)
    v = loss_lib.apply_snr_weight(torch.ones(2), t, sched, 5.0, v_prediction=True)
    assert v.tolist() == pytest.approx([0.014354 / 1.014354, 0.004682 / 1.004682], rel=1e-3)
    debiased = loss_lib.apply_debiased_estimation(torch.ones(2), t, sched, v_prediction=False)
    assert debiased.tolist() == pytest.approx([0.014354 ** -0.5, 0.004682 ** -0.5], rel=1e-3)  # finite at t = T
