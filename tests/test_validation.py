"""Validation on held-out images (validation_split): the loss against a reference computed with diffusers'
primitives, its determinism, and the trainer's schedule of validations and their logs."""
import pytest
import torch
from accelerate import Accelerator

import train_apt_lora
from library.captions import DeferredCaption
from library.config_util import SubsetBlueprint
from library.tiny_models import build_tiny_model
from library.train_args import setup_parser
from library.validation import batch_seed, validation_loss, validation_timesteps
from networks.lora import LoRANetwork


def _batches():
    g = torch.Generator().manual_seed(4)
    return [{"images": None, "latents": torch.randn(2, 4, 8, 8, generator=g), "captions": ["sks dog", "a sks dog"],
             "class_tokens": ["sks dog"] * 2, "prior_class_tokens": ["dog"] * 2,
             "is_reg": torch.zeros(2, dtype=torch.bool), "loss_weights": torch.ones(2),
             "original_sizes_hw": torch.tensor([[64, 64]] * 2), "crop_top_lefts": torch.zeros(2, 2, dtype=torch.long),
             "target_sizes_hw": torch.tensor([[64, 64]] * 2), "image_keys": [f"k{i}" for i in range(2)]}
            for _ in range(2)]


def _held_out_dataset(tmp_path, n: int, split: float):
    """`n` random 64² images and a dataset TOML holding `split` of them out (batch 1, class tokens "sks dog")."""
    import numpy as np
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.png")
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 1\nvalidation_split = {split}\n  [[datasets.subsets]]\n'
                    f'  image_dir = "{d.as_posix()}"\n  class_tokens = "sks dog"\n')
    return toml


def test_timesteps_as_sd_scripts_picks_them():
    sched = build_tiny_model("sd1").noise_scheduler
    assert validation_timesteps(setup_parser().parse_args([]), sched) == [200, 400, 600, 800]
    args = setup_parser().parse_args(["--min_timestep", "100", "--max_timestep", "500"])
    assert validation_timesteps(args, sched) == [180, 260, 340, 420]


def test_validation_loss_equals_the_reference_and_leaves_training_as_it_was(monkeypatch):
    args = setup_parser().parse_args(["--network_dropout", "0.5", "--cache_latents"])
    model = build_tiny_model("sd1")
    network = LoRANetwork(model, lora_dim=4, alpha=4.0, dropout=0.5)
    network.apply_to()
    with torch.no_grad():  # a LoRA that changes the output
        for lora in network.loras:
            lora.lora_up.weight.normal_(0, 0.05)
    network.train()
    ctx = train_apt_lora.TrainContext(args, Accelerator(cpu=True), model, network, torch.float32, torch.float32, None)
    before = {k: v.clone() for k, v in network.state_dict().items()}

    torch.manual_seed(99)
    value = validation_loss(args, ctx, _batches(), seed=7)
    after_rng = torch.rand(3)
    torch.manual_seed(99)
    assert torch.equal(after_rng, torch.rand(3))  # the training's random stream is untouched
    assert network.training and all(torch.equal(v, before[k]) for k, v in network.state_dict().items())
    assert validation_loss(args, ctx, _batches(), seed=7) == value  # the same noise every run
    warm, deferred = SubsetBlueprint(token_warmup_step=5, token_warmup_min=0), _batches()
    for b in deferred:  # at step 0 they would be "": validated as after the token warm-up, whole
        b["captions"] = [DeferredCaption(warm, c, 1, "seed") for c in b["captions"]]
    assert validation_loss(args, ctx, deferred, seed=7) == value

    # reference: diffusers' add_noise and UNet, dropout off, ε target, MSE averaged over samples and 4 timesteps
    network.eval()
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(_batches()):
            torch.manual_seed(batch_seed(7, i))
            context = ctx.encode_text(batch["captions"]).context
            for t in (200, 400, 600, 800):
                ts = torch.full((2,), t)
                noise = torch.randn_like(batch["latents"])
                noisy = model.noise_scheduler.add_noise(batch["latents"], noise, ts)
                pred = model.unet(noisy, ts, encoder_hidden_states=context).sample
                losses.append(((pred - noise) ** 2).mean(dim=(1, 2, 3)))
    assert value == pytest.approx(float(torch.cat(losses).mean()), rel=1e-5)
    assert validation_loss(args, ctx, _batches(), seed=7, max_batches=1) != value  # one batch only

    # two processes: each validates every other batch (here its one batch; all_reduce stubbed out, so each returns
    # its own mean), with the noise of that batch, so the halves make up the one-process value
    class Rank:
        def __init__(self, i):
            self.device, self.process_index, self.num_processes = torch.device("cpu"), i, 2

    halves = []
    for r in (0, 1):
        calls = []
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: calls.append(t.clone()))
        ctx.accelerator = Rank(r)
        halves.append(validation_loss(args, ctx, _batches(), seed=7))
        assert len(calls) == 1 and calls[0][1] == 8  # one reduce, of this rank's 2 samples at 4 timesteps
    assert halves[0] == pytest.approx(float(torch.cat(losses[:4]).mean()), rel=1e-5)
    assert (halves[0] + halves[1]) / 2 == pytest.approx(value, rel=1e-6) and halves[0] != halves[1]


def test_validation_loss_weighs_by_the_mask_the_batchs_multiplier_and_huber_c_of_each_timestep():
    """What a held-out batch carries and the loss type change the number, as in training: its loss mask (masked
    loss or alpha_mask), its dataset's network_multiplier (the LoRA validated at the strength it trains at) and
    --loss_type huber's c at each validation timestep (snr schedule). Without them the validation curve measures
    another loss than the one trained and compared runs disagree. Reference: diffusers' primitives, the weights
    written out."""
    model = build_tiny_model("sd1")
    network = LoRANetwork(model, lora_dim=4, alpha=4.0)
    network.apply_to()
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.normal_(0, 0.5)  # a LoRA that changes the output markedly

    def validate(argv, batches, per_batch_multiplier=False):
        args = setup_parser().parse_args(argv + ["--cache_latents"])
        ctx = train_apt_lora.TrainContext(args, Accelerator(cpu=True), model, network, torch.float32, torch.float32,
                                          None)
        ctx.batch_multipliers = per_batch_multiplier
        return validation_loss(args, ctx, batches, seed=3)

    def reference(element, batches, multiplier=1.0, mask=None):
        network.set_multiplier(multiplier)
        network.eval()
        losses = []
        with torch.no_grad():
            for i, batch in enumerate(batches):
                torch.manual_seed(batch_seed(3, i))
                context = train_apt_lora.TrainContext(setup_parser().parse_args([]), Accelerator(cpu=True), model,
                                                      network, torch.float32, torch.float32,
                                                      None).encode_text(batch["captions"]).context
                for t in (200, 400, 600, 800):
                    ts = torch.full((2,), t)
                    noise = torch.randn_like(batch["latents"])
                    pred = model.unet(model.noise_scheduler.add_noise(batch["latents"], noise, ts), ts,
                                      encoder_hidden_states=context).sample
                    e = element(pred - noise, t)
                    losses.append((e if mask is None else e * mask[:, None]).mean(dim=(1, 2, 3)))
        network.set_multiplier(1.0)
        return float(torch.cat(losses).mean())

    mse = lambda d, t: d ** 2  # noqa: E731
    mask = torch.ones(2, 8, 8)
    mask[:, :, 4:] = 0.0  # the right half of the latent does not count
    mask[1, :4, :4] = 0.5
    masked = _batches()
    for b in masked:
        b["alpha_masks"] = mask.clone()
    assert validate([], masked) == pytest.approx(reference(mse, _batches(), mask=mask), rel=1e-5)

    halved = _batches()
    for b in halved:
        b["network_multiplier"] = 0.5
    value = validate([], halved, per_batch_multiplier=True)
    assert value == pytest.approx(reference(mse, _batches(), multiplier=0.5), rel=1e-5)
    assert value != pytest.approx(reference(mse, _batches()), rel=1e-4)  # at 1.0: 0.1% apart, 100x the tolerance

    ac = model.noise_scheduler.alphas_cumprod

    def huber(d, t):  # sd-scripts' snr schedule, huber_c 0.1: (1 - c) / (1 + sigma_t)^2 + c
        c = (1 - 0.1) / (1 + ((1 - ac[t]) / ac[t]) ** 0.5) ** 2 + 0.1
        return 2 * c * (torch.sqrt(d ** 2 + c ** 2) - c)

    assert validate(["--loss_type", "huber"], _batches()) == pytest.approx(reference(huber, _batches()), rel=1e-5)


def test_sdxl_validation_conditions_on_each_held_out_images_sizes_and_crop():
    """SDXL: a held-out image's original size, crop and target size reach the UNet as the time ids in diffusers'
    order [orig_h, orig_w, crop_top, crop_left, target_h, target_w], as in training; sizes swapped or dropped, a
    bucketed or cropped image was validated under another conditioning than it trains with. Reference: the UNet
    called with those six numbers written out."""
    model = build_tiny_model("sdxl")
    network = LoRANetwork(model, lora_dim=4, alpha=4.0)
    network.apply_to()
    args = setup_parser().parse_args(["--cache_latents"])
    ctx = train_apt_lora.TrainContext(args, Accelerator(cpu=True), model, network, torch.float32, torch.float32, None)
    batches = _batches()
    for b in batches:
        b["original_sizes_hw"] = torch.tensor([[96, 64], [40, 200]])
        b["crop_top_lefts"] = torch.tensor([[16, 0], [0, 8]])
        b["target_sizes_hw"] = torch.tensor([[64, 64], [64, 64]])
    value = validation_loss(args, ctx, batches, seed=7)
    time_ids = torch.tensor([[96.0, 64, 16, 0, 64, 64], [40, 200, 0, 8, 64, 64]])
    network.eval()
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(_batches()):
            torch.manual_seed(batch_seed(7, i))
            cond = ctx.encode_text(batch["captions"])
            for t in (200, 400, 600, 800):
                ts = torch.full((2,), t)
                noise = torch.randn_like(batch["latents"])
                pred = model.unet(model.noise_scheduler.add_noise(batch["latents"], noise, ts), ts,
                                  encoder_hidden_states=cond.context,
                                  added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids}).sample
                losses.append(((pred - noise) ** 2).mean(dim=(1, 2, 3)))
    assert value == pytest.approx(float(torch.cat(losses).mean()), rel=1e-5)


def test_trainer_validates_on_schedule_and_logs(tiny_world, tmp_path, capsys, tb_scalars):
    """6 images, 30% held out: ceil(0.7 · 6) = 5 trained on (5 steps an epoch at batch 1), 1 validated every 3
    steps and at each epoch's end, once per step; the LoRA's metadata counts the training images and the held-out
    one apart, and each save's ss_epoch is the epochs completed, as sd-scripts writes it."""
    from safetensors import safe_open

    toml = _held_out_dataset(tmp_path, 6, 0.3)
    out = tmp_path / "out"
    assert train_apt_lora.main(["--pretrained_model_name_or_path", tiny_world.model("sd1"), "--dataset_config",
                                str(toml), "--output_dir", str(out), "--output_name", "lora", "--max_train_steps", "6",
                                "--validate_every_n_steps", "3", "--logging_dir", str(out / "logs"), "--apt",
                                "--save_every_n_steps", "4", "--save_every_n_epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert [line.split(" at step ")[1] for line in printed.splitlines() if line.startswith("validation loss")] == \
        ["3", "5", "6"]  # step 3, the end of epoch 1 (step 5), step 6 (which also ends the run)
    steps = {tag: [step for step, _ in values] for tag, values in tb_scalars(out / "logs").items()
             if "validation" in tag}
    assert steps == {"loss/validation/step_current": [3, 6], "loss/validation/epoch_average": [5, 6]}
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == "5" and f.metadata()["ss_num_validation_images"] == "1"
    epochs = {}
    for name in ("lora-step00000004", "lora-000001", "lora"):  # step 4 of epoch 1; epoch 1's end; the end (2 epochs)
        with safe_open(str(out / f"{name}.safetensors"), "pt") as f:
            epochs[name] = (f.metadata()["ss_steps"], f.metadata()["ss_epoch"])
    assert epochs == {"lora-step00000004": ("4", "0"), "lora-000001": ("5", "1"), "lora": ("6", "2")}


def test_a_split_that_holds_out_nothing_is_refused(tiny_world, tmp_path, capsys):
    rc = train_apt_lora.main(["--pretrained_model_name_or_path", tiny_world.model("sd1"), "--dataset_config",
                              tiny_world.dataset, "--output_dir", str(tmp_path), "--validation_split", "0.2"])
    assert rc == 2 and "validation_split holds out no image" in capsys.readouterr().err  # 3 images: ceil(2.4) = 3


def test_cached_held_out_latents_do_not_depend_on_the_training_seed(tiny_world, tmp_path, capsys):
    """With --cache_latents the held-out images' VAE samples were drawn from the training stream (after the
    training images'), so --seed (or adding training images) changed the validation latents under a fixed
    --validation_seed. They come from the validation seed now: at a learning rate of 1e-30 (the LoRA stays at its
    start, up = 0) runs with --seed 1 and --seed 2 report the same validation loss."""
    import re

    toml = _held_out_dataset(tmp_path, 4, 0.25)
    found = []
    for seed in ("1", "2"):
        assert train_apt_lora.main(["--pretrained_model_name_or_path", tiny_world.model("sd1"), "--dataset_config",
                                    str(toml), "--output_dir", str(tmp_path / seed), "--seed", seed,
                                    "--validation_seed", "5", "--cache_latents", "--learning_rate", "1e-30",
                                    "--max_train_steps", "1"]) == 0
        found += re.findall(r"validation loss (\S+) at step 1", capsys.readouterr().out)
    assert len(found) == 2 and found[0] == found[1], found


def test_trainer_validates_every_n_epochs(tiny_world, tmp_path, tb_scalars):
    """--validate_every_n_epochs 2 over 3 epochs: the validation loss at the end of epoch 2 only (sd-scripts'
    cadence), as TensorBoard reads it back. (5 training images in batches of 5: one step an epoch.)"""
    toml = _held_out_dataset(tmp_path, 6, 0.3)
    toml.write_text(toml.read_text().replace("batch_size = 1", "batch_size = 5"))
    out = tmp_path / "out"
    assert train_apt_lora.main(["--pretrained_model_name_or_path", tiny_world.model("sd1"), "--dataset_config",
                                str(toml), "--output_dir", str(out), "--output_name", "lora", "--max_train_epochs", "3",
                                "--validate_every_n_epochs", "2", "--logging_dir", str(out / "logs")]) == 0
    steps = {tag: [step for step, _ in values] for tag, values in tb_scalars(out / "logs").items()
             if "validation" in tag}
    assert steps == {"loss/validation/epoch_average": [2]}
