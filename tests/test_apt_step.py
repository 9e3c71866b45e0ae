"""The APT step on tiny models: agreement at step 0, gradient checkpointing, DCO, and runs of the trainer."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train_apt_lora
from apt_ext.step import APT, apply_preset
from library.tiny_models import build_tiny_model, write_tiny_model
from library.train_args import setup_parser
from networks.lora import LoRANetwork


def _args(*extra):
    return setup_parser().parse_args(["--apt", *extra])


def _batch(bsz, captions, class_tokens="sks dog", prior="dog", sdxl=False):
    torch.manual_seed(123)
    return {
        "images": None, "latents": torch.randn(bsz, 4, 8, 8), "captions": captions,
        "class_tokens": [class_tokens] * bsz, "prior_class_tokens": [prior] * bsz,
        "is_reg": torch.zeros(bsz, dtype=torch.bool), "loss_weights": torch.ones(bsz),
        "original_sizes_hw": torch.tensor([[64, 64]] * bsz), "crop_top_lefts": torch.zeros(bsz, 2, dtype=torch.long),
        "target_sizes_hw": torch.tensor([[64, 64]] * bsz), "image_keys": [f"k{i}" for i in range(bsz)],
    }


def _ctx(arch, args, checkpointing=False):
    model = build_tiny_model(arch)
    network = LoRANetwork(model, lora_dim=4, alpha=4.0)
    network.apply_to()
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
        model.unet.train()
    accelerator = Accelerator(cpu=True)
    apt = APT(args, model, accelerator.device)
    ctx = train_apt_lora.TrainContext(args, accelerator, model, network, torch.float32, torch.float32, None, apt)
    return ctx, apt, network


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_step0_agrees_when_prompts_equal_and_not_otherwise(arch):
    """LoRA up-weights start at zero: with c == c* both passes are the same model on the same input."""
    args = _args("--cache_latents")
    ctx, apt, _ = _ctx(arch, args)
    same = _batch(2, ["a photo of dog", "dog on grass"], class_tokens=None, prior=None)
    torch.manual_seed(0)
    _, logs = train_apt_lora.training_step(args, ctx, same)
    assert logs["apt/L_mu"] == 0.0 and logs["apt/L_sigma"] == 0.0 and logs["apt/L_attn"] == 0.0
    assert logs["apt/L_theta"] == logs["apt/L_phi"] and logs["apt/delta_noise"] == 0.0
    assert torch.all(apt.indicator.gamma() == 0) and apt.indicator.seen.any()

    differ = _batch(2, ["a photo of sks dog", "sks dog on grass"])
    _, logs = train_apt_lora.training_step(args, ctx, differ)
    assert logs["apt/L_mu"] > 0 and logs["apt/L_sigma"] > 0 and logs["apt/L_attn"] > 0
    assert logs["apt/L_theta"] != logs["apt/L_phi"]


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    """All APT terms backpropagate the same with checkpointing on (tolerance 1e-5 relative)."""
    args = _args("--cache_latents", "--apt_components", "rs,aa")
    results = []
    for ckpt in (False, True):
        ctx, apt, network = _ctx("sd1", args, checkpointing=ckpt)
        with torch.no_grad():  # nonzero LoRA so the fine-tuned pass differs from the prior
            for i, lora in enumerate(network.loras):  # the same numbers in every process (hash() is salted)
                lora.lora_up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
        torch.manual_seed(5)
        loss, logs = train_apt_lora.training_step(args, ctx, _batch(2, ["a photo of sks dog", "sks dog"]))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
        results.append((loss.item(), logs, grads))
    (l0, logs0, g0), (l1, logs1, g1) = results
    assert logs0["apt/L_attn"] > 0 and logs0["apt/L_mu"] > 0
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    nonzero = [n for n, g in g0.items() if g.abs().sum() > 0]
    assert nonzero, "the APT losses must reach the LoRA parameters"
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-7)


def test_regularizers_alone_have_gradients_with_checkpointing():
    """λ terms only (no denoising loss gradient): the captured tensors must carry the graph under checkpointing."""
    args = _args("--cache_latents", "--apt_components", "rs,aa")
    ctx, apt, network = _ctx("sd1", args, checkpointing=True)
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.fill_(0.01)
    with apt.capture.capture("prior") as rec_p, torch.no_grad(), network.multiplier_override(0.0):
        x = torch.randn(1, 4, 8, 8)
        cond_p = ctx.encode_text(["a photo of dog"])
        ctx.model.unet(x, torch.tensor([500]), cond_p.context)
    with apt.capture.capture("ft") as rec_f:
        cond = ctx.encode_text(["a photo of sks dog"])
        ctx.model.unet(x, torch.tensor([500]), cond.context)
    from apt_ext.losses import attn_loss, rs_losses

    l_mu, l_sigma = rs_losses(rec_f.stats, rec_p.stats)
    (l_mu + l_sigma + attn_loss(rec_f.attn, rec_p.attn, None, rec_f.num_heads)).backward()
    assert sum(float(p.grad.abs().sum()) for p in network.parameters() if p.grad is not None) > 0


def test_dco_loss_type_uses_prior_pass_without_apt():
    args = setup_parser().parse_args(["--loss_type", "dco", "--cache_latents"])
    ctx, apt, network = _ctx("sd1", args)
    assert apt.components == frozenset() and apt.capture is None
    loss, logs = train_apt_lora.training_step(args, ctx, _batch(2, ["a photo of sks dog", "sks dog"]))
    # step 0: L_θ ≈ L_φ up to the prompt, DCO loss = softplus(β (L_θ − L_φ)) per sample
    assert torch.isfinite(loss) and "apt/L_mu" not in logs
    assert apt.metadata()["apt_loss_type"] == "dco" and apt.metadata()["apt_dco_beta"] == "1000.0"


def _record_losses(monkeypatch, ft_scale=lambda: 1.0):
    """Patch the step's per-sample loss to record (pass, pred, target) of each call, the fine-tuned pass told apart
    by its gradient; the fine-tuned loss is scaled by `ft_scale()` (1: unchanged)."""
    import library.losses

    calls = []
    real = library.losses.per_sample_loss

    def spy(pred, target, *a, **k):
        ft = pred.requires_grad
        calls.append(("ft" if ft else "prior", pred.detach().float().clone(), target.detach().float().clone()))
        out = real(pred, target, *a, **k)
        return out * ft_scale() if ft else out

    monkeypatch.setattr(library.losses, "per_sample_loss", spy)
    return calls


def _passes(calls):
    """The first fine-tuned and the first prior call that `_record_losses` recorded."""
    return next(c for c in calls if c[0] == "ft"), next(c for c in calls if c[0] == "prior")


def _mse(pred, target):
    """Per-sample mean squared error over C·H·W, by hand."""
    return ((pred - target) ** 2).reshape(pred.shape[0], -1).mean(dim=1)


def _reg_batch(loss_weights):
    """Two subject samples ("sks dog" -> "dog") and one regularization sample (caption already the class prompt)."""
    batch = _batch(3, ["a photo of sks dog", "sks dog on grass", "a photo of dog"])
    return dict(batch, class_tokens=["sks dog", "sks dog", "dog"], prior_class_tokens=["dog", "dog", "dog"],
                is_reg=torch.tensor([False, False, True]), loss_weights=torch.tensor(loss_weights))


def test_apt_loss_weights_reg_samples_and_loss_weights_as_designed(monkeypatch):
    """Eq. 7 with a regularization sample, --prior_loss_weight 0.5 and γ = 1 − e^−0.5 in every bin: subject samples
    are weighted (1 − γ), the reg sample keeps 1 (the indicator does not measure it: shrinking it would weaken prior
    preservation exactly when the subject overfits), and every sample carries its loss weight. The logs report
    p = min(γ, p_max) (0 for reg samples) and ΔNoise as a mean over elements."""
    args = _args("--cache_latents", "--apt_aug_p_max", "0.25")
    ctx, apt, network = _ctx("sd1", args)
    with torch.no_grad():  # a trained LoRA: the two passes differ
        for i, lora in enumerate(network.loras):
            lora.lora_up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    ind = apt.indicator  # τ = 100 (SD1 default): ema_φ − ema_θ = 0.005 in every bin gives γ = 1 − e^−0.5
    ind.ema_prior = torch.full((10,), 0.020, dtype=torch.float64)
    ind.ema_ft = torch.full((10,), 0.015, dtype=torch.float64)
    ind.seen = torch.ones(10, dtype=torch.bool)
    calls = _record_losses(monkeypatch)
    torch.manual_seed(11)
    loss, logs = train_apt_lora.training_step(args, ctx, _reg_batch([1.0, 1.0, 0.5]))

    (_, pred, target), (_, pred_prior, target_p) = _passes(calls)
    assert torch.equal(target, target_p)
    mse_ft = _mse(pred, target)
    gamma = 1.0 - math.exp(-100 * 0.005)
    w = torch.tensor([1.0 - gamma, 1.0 - gamma, 1.0])  # reg: 1, not 1 − γ
    lw = torch.tensor([1.0, 1.0, 0.5])  # prior_loss_weight on the reg sample
    expected = (w * lw * mse_ft).mean() + 30.0 * (logs["apt/L_mu"] + logs["apt/L_sigma"]) + 3e-4 * logs["apt/L_attn"]
    assert logs["apt/L_mu"] > 0 and logs["apt/L_attn"] > 0
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert float(logs["apt/L_theta"]) == pytest.approx(float(mse_ft.mean()), rel=1e-5)
    assert float(logs["apt/gamma_mean_batch"]) == pytest.approx(gamma, rel=1e-6)
    assert float(logs["apt/p_aug"]) == pytest.approx((0.25 + 0.25 + 0.0) / 3, rel=1e-6)  # min(γ, p_max); reg: 0
    assert float(logs["apt/delta_noise"]) == pytest.approx(float((pred - pred_prior).pow(2).mean()), rel=1e-5)


def test_gamma_rises_where_the_fine_tuned_loss_is_below_the_prior_and_falls_back(monkeypatch):
    """The indicator gets (L_φ, L_θ) the right way round: a bin where the LoRA fits better than the prior (L_θ < L_φ)
    gets γ > 0, and later steps where it fits worse bring γ back down to 0, by the EMA of §2.1 computed by hand from
    the step's own per-sample losses. Swapped, γ would rise when the LoRA fits worse and APT would augment and
    down-weight the bins that are not overfitting."""
    import library.noise

    args = _args("--cache_latents", "--apt_components", "none", "--apt_gamma_temperature", "1")
    ctx, apt, _ = _ctx("sd1", args)
    monkeypatch.setattr(library.noise, "sample_timesteps", lambda *a, **k: torch.tensor([150, 720]))  # bins 1, 7
    scales = iter([0.5, 3.0, 3.0, 3.0])  # L_θ halved at the first step, tripled after
    scale = [1.0]
    calls = _record_losses(monkeypatch, ft_scale=lambda: scale[0])
    batch = _batch(2, ["a photo of sks dog", "sks dog on grass"])
    ema_p = ema_f = None
    gammas = []
    for step in range(4):
        scale[0] = next(scales)
        calls.clear()
        torch.manual_seed(step)
        train_apt_lora.training_step(args, ctx, batch)
        (_, pred, target), (_, pred_prior, _) = _passes(calls)
        x_f, x_p = _mse(pred, target).double() * scale[0], _mse(pred_prior, target).double()
        ema_p = x_p if ema_p is None else 0.9 * ema_p + 0.1 * x_p
        ema_f = x_f if ema_f is None else 0.9 * ema_f + 0.1 * x_f
        expected = (1.0 - torch.exp(-(ema_p - ema_f))).clamp(0.0, 1.0)
        got = apt.indicator.gamma()[[1, 7]].double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        gammas.append(got)
    assert (gammas[0] > 0.2).all()  # fits better than the prior: overfitting rises
    assert (gammas[1] < gammas[0]).all() and (gammas[3] == 0).all()  # fits worse: back to 0


def test_dco_loss_is_for_subject_samples_and_reg_samples_keep_the_plain_loss(monkeypatch):
    """--loss_type dco with prior preservation: subject samples get softplus(β (L_θ − L_φ)), reg samples keep their
    plain MSE (DCO's reference would otherwise pull reg images toward the base model's own prediction, no prior
    preservation at all), and every sample carries its loss weight (--prior_loss_weight 0.5 on the reg sample)."""
    args = setup_parser().parse_args(["--loss_type", "dco", "--cache_latents", "--dco_beta", "100"])
    ctx, apt, network = _ctx("sd1", args)
    with torch.no_grad():
        for i, lora in enumerate(network.loras):
            lora.lora_up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    calls = _record_losses(monkeypatch)
    torch.manual_seed(3)
    loss, _ = train_apt_lora.training_step(args, ctx, _reg_batch([1.0, 1.0, 0.5]))
    (_, pred, target), (_, pred_prior, _) = _passes(calls)
    l_ft, l_prior = _mse(pred, target).tolist(), _mse(pred_prior, target).tolist()

    def softplus(x):  # log(1 + e^x), written stably
        return max(x, 0.0) + math.log1p(math.exp(-abs(x)))

    per_sample = [softplus(100 * (l_ft[0] - l_prior[0])), softplus(100 * (l_ft[1] - l_prior[1])), l_ft[2]]
    expected = (per_sample[0] * 1.0 + per_sample[1] * 1.0 + per_sample[2] * 0.5) / 3
    assert abs(softplus(100 * (l_ft[2] - l_prior[2])) - l_ft[2]) > 0.05  # the reg sample's two losses differ
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_components_none_monitors_without_changing_the_loss():
    """--apt_components none: the indicator runs and γ is used for nothing; the loss is the plain MSE."""
    args = _args("--cache_latents", "--apt_components", "none")
    ctx, apt, _ = _ctx("sd1", args)
    assert apt.components == frozenset() and apt.capture is None and apt.fill_latent is None
    apt.indicator.gamma_for = lambda t: torch.ones(t.shape[0])  # as if fully overfit: still no augmentation
    batch = _batch(2, ["a photo of sks dog", "sks dog"])
    torch.manual_seed(5)
    loss, logs = train_apt_lora.training_step(args, ctx, batch)
    assert loss.item() == pytest.approx(float(logs["apt/L_theta"]), rel=1e-6)
    assert logs["apt/aug_fraction"] == 0.0 and "apt/L_mu" not in logs and "apt/L_attn" not in logs
    assert apt.indicator.seen.any() and apt.metadata()["apt_components"] == ""


def test_alpha_masks_weight_both_passes_and_move_with_the_augmentation(monkeypatch):
    """Alpha masks of ones change nothing; augmented, the mask is warped with the latents (border 0, centre 1)
    and the same mask weights the fine-tuned loss and the prior loss that the indicator compares."""
    import library.losses

    args = _args("--cache_latents", "--apt_aug_p_max", "1")
    ctx, apt, _ = _ctx("sd1", args)
    batch = _batch(2, ["a photo of sks dog", "sks dog"])
    masked = dict(batch, alpha_masks=torch.ones(2, 64, 64))
    runs = []
    for b in (batch, masked):
        torch.manual_seed(7)
        runs.append(train_apt_lora.training_step(args, ctx, b)[1])
        apt.indicator.load_state_dict(_ctx("sd1", args)[1].indicator.state_dict())  # the same γ (0) for both
    assert {k: float(v) for k, v in runs[0].items()} == {k: float(v) for k, v in runs[1].items()}

    seen = []
    real = library.losses.per_sample_loss
    monkeypatch.setattr(library.losses, "per_sample_loss",
                        lambda *a, mask=None, **k: (seen.append(mask), real(*a, mask=mask, **k))[1])
    apt.indicator.gamma_for = lambda t: torch.ones(t.shape[0])  # fully overfit: every sample augmented
    _, logs = train_apt_lora.training_step(args, ctx, masked)
    assert logs["apt/aug_fraction"] == 1.0
    ft, prior = seen[:2]
    assert ft is prior and ft.shape == (2, 64, 64)
    assert float(ft[:, 0, 0].max()) == 0.0 and float(ft[:, 32, 32].min()) == pytest.approx(1.0)


def test_components_parse_errors_name_the_choices():
    from apt_ext.step import parse_components

    assert parse_components("none") == frozenset() and parse_components("all") == {"ata", "rs", "aa"}
    with pytest.raises(ValueError, match="none"):
        parse_components("ata,xyz")


def test_preset_sets_only_what_the_user_did_not_set(tmp_path):
    """--apt_preset fills in the arguments the user left out; one given on the command line or in --config_file
    wins even at its default value (a GUI's config writes `learning_rate = 0.0001`; it was replaced before)."""
    from library.config_file import given_dests, parse_args_with_config

    parser = setup_parser()
    argv = ["--apt_preset", "sdxl", "--network_dim", "8"]
    args = parser.parse_args(argv)
    changed = apply_preset(args, given_dests(parser, argv))
    assert args.apt and args.network_dim == 8 and "network_dim" not in changed
    assert args.network_alpha == 32.0 and args.unet_lr == 5e-5 and args.text_encoder_lr == 5e-6
    assert args.apt_gamma_temperature == 1000.0

    defaults = {a.dest: a.default for a in parser._actions}
    (tmp_path / "run.toml").write_text("[training]\nunet_lr = 1e-4\npretrained_model_name_or_path = 'm'\n",
                                       encoding="utf-8")
    argv = ["--config_file", str(tmp_path / "run.toml"), "--apt_preset", "sd1", "--learning_rate",
            str(defaults["learning_rate"]), "--network_alpha", str(defaults["network_alpha"]), "--optimizer_type",
            "AdamW"]
    args = parse_args_with_config(parser, argv)
    changed = apply_preset(args, given_dests(parser, argv))
    assert args.learning_rate == defaults["learning_rate"] and args.network_alpha == defaults["network_alpha"]
    assert args.unet_lr == 1e-4 and args.optimizer_type == "AdamW"
    assert sorted(changed) == ["apt_gamma_temperature", "network_dim", "text_encoder_lr"]
    assert args.network_dim == 32 and args.text_encoder_lr == 5e-6 and args.apt_gamma_temperature == 100.0

    # --output_config writes what the user gave even at its default, so the preset leaves it alone when loaded
    out = tmp_path / "written.toml"
    argv = ["--pretrained_model_name_or_path", "m", "--apt_preset", "sd1", "--learning_rate",
            str(defaults["learning_rate"]), "--config_file", str(out), "--output_config"]
    assert train_apt_lora.main(argv) == 0
    text = out.read_text(encoding="utf-8")
    assert f"learning_rate = {defaults['learning_rate']!r}" in text and 'apt_preset = "sd1"' in text
    back = parse_args_with_config(parser, ["--config_file", str(out)])
    apply_preset(back, given_dests(parser, ["--config_file", str(out)]))
    assert back.learning_rate == defaults["learning_rate"] and back.unet_lr == 5e-5 and back.network_dim == 32


# ------------------------------------------------------------------------------------------ trainer runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("apt")
    model = str(root / "sd1")
    write_tiny_model("sd1", model)
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    ds = root / "ds.toml"
    ds.write_text(f'[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "{imgs}"\n'
                  f'  class_tokens = "sks dog"\n')
    return {"model": model, "dataset": str(ds)}


def _run(world, out, *extra):
    """The trainer with --apt, unless "--no_apt" is among `extra`."""
    apt = [] if "--no_apt" in extra else ["--apt"]
    extra = [e for e in extra if e != "--no_apt"]
    return train_apt_lora.main(["--pretrained_model_name_or_path", world["model"], "--dataset_config", world["dataset"],
                                "--output_dir", str(out), "--output_name", "lora", "--network_dim", "4",
                                "--network_alpha", "4", "--learning_rate", "3e-3", "--seed", "7", *apt, *extra])


@pytest.mark.parametrize("mode", [("--apt",), ("--apt", "--cache_latents"), ("--no_apt", "--cache_latents"),
                                  ("--apt", "--apt_prior_ahead")],
                         ids=["apt-pixels", "apt-cached-latents", "plain-cached-latents", "apt-prior-ahead"])
def test_resume_is_exact(world, tmp_path, mode):
    """4 steps straight == 2 steps + --resume + 2 steps: bit-identical LoRA weights (and indicator state)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--max_train_steps", "4", "--apt_gamma_temperature", "1000", "--lr_scheduler", "cosine", *mode]
    assert _run(world, straight, *common) == 0
    assert _run(world, split, *common, "--save_every_n_steps", "2", "--save_state") == 0
    state = split / "lora-step00000002-state"
    assert (state / "apt.safetensors").exists() == ("--apt" in mode)
    assert json.loads((state / "train_state.json").read_text())["step"] == 2
    resumed = tmp_path / "resumed"
    assert _run(world, resumed, *common, "--resume", str(state)) == 0
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    if "--no_apt" in mode:
        return
    with safe_open(str(straight / "lora.safetensors"), "pt") as f1, safe_open(str(resumed / "lora.safetensors"), "pt") as f2:
        g1, g2 = f1.metadata()["apt_gamma_final"], f2.metadata()["apt_gamma_final"]
        assert g1 == g2 and f1.metadata()["apt_indicator_steps"] == f2.metadata()["apt_indicator_steps"] == "4"


def test_apt_run_writes_heatmap_metadata_and_logs(world, tmp_path):
    out = tmp_path / "out"
    assert _run(world, out, "--max_train_steps", "3", "--apt_components", "ata,aa", "--logging_dir", str(tmp_path / "logs"),
                "--apt_identifier_align", "drop") == 0
    assert (out / "lora_gamma.png").exists()
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["apt_components"] == "ata,aa" and md["apt_identifier_align"] == "drop"
    assert len(json.loads(md["apt_gamma_final"])) == 10
    runs = os.listdir(tmp_path / "logs")
    assert runs and any(f.startswith("events.out.tfevents") for r in runs for _, _, fs in os.walk(tmp_path / "logs" / r) for f in fs)


def test_single_word_class_tokens_is_a_config_error(world, tmp_path, capsys):
    ds = tmp_path / "ds.toml"
    imgs = os.path.dirname(world["dataset"]) + "/imgs"
    ds.write_text(f'[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "{imgs}"\n  class_tokens = "sks"\n')
    rc = train_apt_lora.main(["--pretrained_model_name_or_path", world["model"], "--dataset_config", str(ds),
                              "--output_dir", str(tmp_path / "o"), "--apt", "--max_train_steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "prior_class_tokens" in err and "datasets[0].subsets[0]" in err


def test_reg_subset_with_plain_class_tokens_keeps_its_caption_as_c(world, tmp_path, monkeypatch):
    """sd-scripts reg folders are named `1_dog` (one-word class tokens): under APT their caption is already the
    class prompt, so c = c* for reg samples and the run must not stop on "cannot tell the identifier"."""
    import apt_ext.step as step_mod

    reg = tmp_path / "reg"
    reg.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(reg / f"r{i}.png")
    ds = tmp_path / "ds.toml"
    ds.write_text(open(world["dataset"]).read() + f'  [[datasets.subsets]]\n  image_dir = "{reg}"\n  is_reg = true\n'
                  f'  class_tokens = "dog"\n')
    seen = []
    real = step_mod.class_prompts
    monkeypatch.setattr(step_mod, "class_prompts", lambda caps, ct, pct: seen.append((list(caps), real(caps, ct, pct))) or real(caps, ct, pct))
    w = dict(world, dataset=str(ds))
    assert _run(w, tmp_path / "out", "--max_train_steps", "4", "--prior_loss_weight", "1.0") == 0
    pairs = [(c, p) for caps, prior in seen for c, p in zip(caps, prior)]
    assert ("dog", "dog") in pairs and ("sks dog", "dog") in pairs  # reg: unchanged; subject: identifier dropped


def test_alignment_is_memoised_per_sample_and_equals_the_batch_computation(monkeypatch):
    """apt.alignment: the π rows of alignment_for_batch (tokenizer 1), computed once per sample and reused."""
    import apt_ext.step as step_mod
    from apt_ext.prompts import alignment_for_batch

    args = _args("--cache_latents")
    ctx, apt, _ = _ctx("sdxl", args)
    model = ctx.model
    ft = ["a photo of sks dog", "sks dog on grass", "a cat"]
    pr = ["a photo of dog", "dog on grass", "a cat"]
    ct, pct = ["sks dog", "sks dog", None], ["dog", "dog", None]
    expected = alignment_for_batch(model.tokenizers, ft, pr, "class", None, ct, pct)
    calls = []
    real = step_mod.alignment_for_batch
    monkeypatch.setattr(step_mod, "alignment_for_batch", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    pi = apt.alignment(model, ft, pr, ct, pct, torch.device("cpu"))
    assert torch.equal(pi, expected[0]) and torch.equal(pi, expected[1])  # both SDXL tokenizers give the same π
    assert len(calls) == 3
    pi2 = apt.alignment(model, ft[::-1], pr[::-1], ct[::-1], pct[::-1], torch.device("cpu"))
    assert torch.equal(pi2, expected[0].flip(0)) and len(calls) == 3  # all three rows from the memo
    assert apt.alignment(model, ["a cat"], ["a cat"], [None], [None], torch.device("cpu")) is None


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_base_text_memo_equals_the_lora_off_encoding_and_skips_the_encoders(arch, monkeypatch):
    """APT's class prompts c go through the base text encoders (LoRA off): memoised per caption, they equal a fresh
    encoding with the LoRA at 0 even after the text-encoder LoRA changed, a repeated caption runs no text encoder,
    and the memo keeps only the last BASE_TEXT_MEMO captions (least recently used out first)."""
    from bench.op_count import count_ops

    ctx, apt, network = _ctx(arch, _args())
    with torch.no_grad():
        for lora in network.text_encoder_loras:
            lora.lora_up.weight.normal_(0, 0.5)  # a trained text-encoder LoRA: c must not see it
    first = ctx.encode_base_text(["a photo of dog", "a dog"])
    with torch.no_grad():
        on = ctx.encode_text(["a photo of dog"])
        for lora in network.text_encoder_loras:
            lora.lora_up.weight.mul_(3)  # the LoRA keeps training
        with network.multiplier_override(0.0):
            off = ctx.encode_text(["a dog", "a photo of dog"])
    assert not torch.allclose(on.context, off.context[1:])  # the LoRA does change the encoding
    again, ops = count_ops(lambda: ctx.encode_base_text(["a dog", "a photo of dog", "a dog"]))
    assert torch.equal(again.context, torch.cat([off.context, off.context[:1]]))
    assert torch.equal(first.context, off.context.flip(0))
    if arch == "sdxl":
        assert torch.equal(again.pooled, torch.cat([off.pooled, off.pooled[:1]]))
    assert sum(ops.values()) < 10, ops  # the concatenation only: no text encoder ran
    monkeypatch.setattr(train_apt_lora.TrainContext, "BASE_TEXT_MEMO", 2)
    ctx.encode_base_text(["a cat"])  # "a photo of dog" was used least recently
    assert list(ctx._base_text) == ["a dog", "a cat"]


def test_torch_compile_run_trains_like_the_eager_run(world, tmp_path, capsys):
    """The trainer with --torch_compile (the aot_eager backend: the same graphs as inductor, no generated code):
    the run says what it compiled, and its LoRA equals the eager run's to float rounding."""
    common = ["--max_train_steps", "3", "--cache_latents"]
    assert _run(world, tmp_path / "eager", *common) == 0
    capsys.readouterr()
    assert _run(world, tmp_path / "compiled", *common, "--torch_compile", "--dynamo_backend", "aot_eager") == 0
    out = capsys.readouterr().out
    first, total = (int(re.search(rf"torch.compile: (\d+) graphs compiled in [\d.]+s \(\d+ graph breaks\) {w}",
                                  out).group(1)) for w in ("in the first step", "over the run"))
    assert 0 < first <= total
    a, b = (load_file(str(tmp_path / d / "lora.safetensors")) for d in ("eager", "compiled"))
    assert a.keys() == b.keys()
    for k in a:  # AdamW (lr 3e-3) turns fp32 rounding of a near-zero gradient into up to ~1% of one step
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=3e-5)


def test_a_loaded_gamma_history_holds_no_view_of_the_state_file():
    """On the CPU `.to(device)` returned the loaded tensor itself, a map of the state's apt.safetensors, and the
    γ history kept views of it for the whole run: Windows then refused to replace that state folder (a resume that
    saves to the folder it came from). The history is a copy."""
    from types import SimpleNamespace

    from apt_ext.step import APT

    apt = APT.__new__(APT)
    apt.indicator = SimpleNamespace(device=torch.device("cpu"), load_state_dict=lambda state: None)
    gamma = torch.rand(3, 10)
    apt.load_state_dict({"history.steps": torch.tensor([1, 2, 3]), "history.gamma": gamma})
    assert [s for s, _ in apt._history] == [1, 2, 3] and torch.equal(torch.stack([g for _, g in apt._history]), gamma)
    assert all(g.untyped_storage().data_ptr() != gamma.untyped_storage().data_ptr() for _, g in apt._history)
