"""Issue 6: the training step never makes the host wait for the device.

The step runs on the meta device, where any read of a value (`.item()`, `bool`, `.tolist()`, `.cpu()`, boolean
indexing) raises, and every host-to-device copy is recorded: on CUDA a copy of a pageable host tensor waits for
every queued kernel, so the step may copy only through `library.transfer.to_device` (pinned, non-blocking).
What is read back happens once per optimizer step, at the end of `micro_batch`.
"""
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

import train_apt_lora
from apt_ext.step import APT
from library.tiny_models import build_tiny_model
from library.train_args import setup_parser
from networks.lora import LoRANetwork

META = torch.device("meta")


class BlockingCopies(TorchFunctionMode):
    """Records each host-to-meta copy that is not non-blocking (on CUDA: a stream sync)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.copy_):
            src = args[1] if func is torch.Tensor.copy_ else args[0]
            dst = args[0] if func is torch.Tensor.copy_ else out
            blocking = not kwargs.get("non_blocking", False)
            if torch.is_tensor(src) and torch.is_tensor(dst) and src.device.type == "cpu" and dst.device == META and blocking:
                self.copies.append(f"{func.__name__} of {tuple(src.shape)}")
        elif func in (torch.tensor, torch.as_tensor) and torch.is_tensor(out) and out.device == META:
            if not (torch.is_tensor(args[0]) and args[0].device == META):
                self.copies.append(f"{func.__name__} from host data")
        return out


@pytest.fixture
def meta_autocast(monkeypatch):
    """torch.is_autocast_enabled raises for the meta device (LoRA's fused path asks it); it is off there."""
    real = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False if a and a[0] == "meta" else real(*a))


def _batch(bsz, pixels, masks=False):
    return {
        "alpha_masks": torch.rand(bsz, 64, 64) if masks else None,
        "images": torch.rand(bsz, 3, 64, 64) * 2 - 1 if pixels else None,
        "latents": None if pixels else torch.randn(bsz, 4, 8, 8),
        "captions": ["a photo of sks dog", "sks dog on grass"][:bsz],
        "class_tokens": ["sks dog"] * bsz, "prior_class_tokens": ["dog"] * bsz,
        "is_reg": torch.tensor([False, True][:bsz]), "loss_weights": torch.ones(bsz),
        "original_sizes_hw": torch.tensor([[64, 64]] * bsz), "crop_top_lefts": torch.zeros(bsz, 2, dtype=torch.long),
        "target_sizes_hw": torch.tensor([[64, 64]] * bsz), "image_keys": [f"k{i}" for i in range(bsz)],
    }


def _meta_step(arch, flags, pixels, v_parameterization=False, masks=False):
    """One training step (loss and backward) of the trainer on the meta device; returns the blocking copies."""
    args = setup_parser().parse_args(flags + ([] if pixels else ["--cache_latents"]))
    model = build_tiny_model(arch, v_parameterization=v_parameterization)
    network = LoRANetwork(model, lora_dim=4, alpha=4.0)
    network.apply_to()
    for module in (model.unet, model.vae, *model.text_encoders, network):
        module.to(META)
    accelerator = SimpleNamespace(device=META, num_processes=1)
    apt = APT(args, model, META) if "--apt" in flags else None
    ctx = train_apt_lora.TrainContext(args, accelerator, model, network, torch.float32, torch.float32, None, apt)
    batch = _batch(2, pixels, masks)
    with BlockingCopies() as mode:
        for _ in range(2):  # the second step runs with the memos (base text, alignment rows) filled
            loss, logs = train_apt_lora.training_step(args, ctx, batch)
            loss.backward()
    assert loss.device == META and all(v.device == META for v in logs.values())
    return mode.copies


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("pixels", [False, True], ids=["latents", "pixels"])
def test_apt_step_reads_nothing_back(arch, pixels, meta_autocast):
    """APT with all components: γ lookup, augmentation (pixel or latent space), both passes, captures, losses and
    the indicator's EMA update stay on the device."""
    assert _meta_step(arch, ["--apt"], pixels) == []


@pytest.mark.parametrize("flags", [
    [], ["--min_snr_gamma", "5", "--noise_offset", "0.05", "--adaptive_noise_scale", "0.01"],
    ["--multires_noise_iterations", "6", "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength"],
    ["--loss_type", "huber", "--huber_schedule", "snr", "--debiased_estimation_loss"],
    ["--v_parameterization", "--scale_v_pred_loss_like_noise_pred", "--min_snr_gamma", "5"],
    ["--apt", "--loss_type", "dco"]], ids=lambda f: " ".join(f) or "plain")
def test_step_options_read_nothing_back(flags, meta_autocast):
    """The usual sd-scripts options: their timestep-dependent weights index ᾱ on the device."""
    assert _meta_step("sd1", flags, pixels=False, v_parameterization="--v_parameterization" in flags) == []


@pytest.mark.parametrize("flags,pixels", [(["--apt"], False), (["--apt"], True), ([], False)],
                         ids=["apt-latents", "apt-pixels", "plain"])
def test_alpha_masked_steps_read_nothing_back(flags, pixels, meta_autocast):
    """Alpha masks: copied with the batch, warped with the augmentation, area-resized into the losses."""
    assert _meta_step("sd1", flags, pixels, masks=True) == []


def test_a_blocking_copy_is_caught(meta_autocast):
    """The audit itself: a pageable copy in the step is reported."""
    with BlockingCopies() as mode:
        torch.ones(3).to(META)
        torch.tensor([1.0, 2.0], device=META)
    assert mode.copies == ["to of (3,)", "tensor from host data"]


def test_micro_batch_reads_the_device_once_per_window(monkeypatch):
    """The window's end reads the NaN/inf flags, the loss and the logs asked for in one `.tolist()`."""
    from accelerate import Accelerator

    net = torch.nn.Linear(3, 1)
    ctx = SimpleNamespace(accelerator=Accelerator(cpu=True), network=net, window_losses=[], window_keys=[],
                          keep_grads=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x = torch.tensor([[1.0, 2.0, 3.0]])

    def step(args, ctx, batch):
        loss = (net(x) ** 2).mean()
        return loss, {"a": loss * 2, "b": torch.tensor(7.0)}

    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real: (reads.append(_n), _r(self, *a))[1])
    expected = float((net(x) ** 2).mean().detach().numpy())
    res = train_apt_lora.micro_batch(SimpleNamespace(max_grad_norm=1.0), ctx, {"image_keys": ["a"]}, opt, sched,
                                     list(net.parameters()), step, read=("a", "missing"))
    monkeypatch.undo()
    assert reads == ["tolist"] and res.status == "stepped"
    assert res.values == pytest.approx({"loss": expected, "a": 2 * expected})
