"""The prior pass on static buffers (apt_ext/prior_graph.py, --apt_cuda_graph): the replay data flow, and APT steps
through it equal to the eager steps. The CUDA recording itself needs a GPU (bench/gpu_check.sh); on the CPU the
"eager" backend runs the same buffers, copies and per-shape recordings."""
import pytest
import torch
from accelerate import Accelerator

import train_apt_lora
from apt_ext.prior_graph import StaticPass, signature
from apt_ext.step import APT
from library.tiny_models import build_tiny_model
from library.train_args import setup_parser
from networks.lora import LoRANetwork


def test_static_pass_records_once_per_shape_and_replays_new_inputs():
    calls = []

    def fn(x, bias):
        calls.append(tuple(x.shape))
        return [x * 2 + (0 if bias is None else bias.sum()), x.mean(dim=-1)]

    sp = StaticPass(fn, backend="eager")
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(2, 3)
    out = sp(a, torch.tensor([1.0, 2.0]))
    assert torch.equal(out[0], a * 2 + 3) and torch.equal(out[1], a.mean(-1)) and len(sp) == 1
    out[0].zero_()  # a caller may change what it got: the recording is untouched
    out = sp(b, torch.tensor([0.5, 0.5]))  # same signature: replay on the new values
    assert torch.equal(out[0], b * 2 + 1) and len(sp) == 1
    out = sp(torch.ones(4, 3), None)  # another shape (a new bucket), and a None input
    assert torch.equal(out[0], torch.full((4, 3), 2.0)) and len(sp) == 2
    assert sp(a, torch.tensor([1.0, 2.0]))[0].tolist() == (a * 2 + 3).tolist()
    assert signature([a, None]) == (((2, 3), torch.float32, "cpu"), None)


def test_static_pass_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        StaticPass(lambda x: [x], backend="graph")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            StaticPass(lambda x: [x], backend="cuda")


def _batch(bsz, h, w, seed, sdxl_size=64):
    g = torch.Generator().manual_seed(seed)
    return {
        "images": None, "latents": torch.randn(bsz, 4, h, w, generator=g),
        "captions": ["a photo of sks dog", "sks dog on grass", "a sks dog"][:bsz],
        "class_tokens": ["sks dog"] * bsz, "prior_class_tokens": ["dog"] * bsz,
        "is_reg": torch.zeros(bsz, dtype=torch.bool), "loss_weights": torch.ones(bsz),
        "original_sizes_hw": torch.tensor([[sdxl_size, sdxl_size]] * bsz),
        "crop_top_lefts": torch.zeros(bsz, 2, dtype=torch.long),
        "target_sizes_hw": torch.tensor([[sdxl_size, sdxl_size]] * bsz), "image_keys": [f"k{i}" for i in range(bsz)],
    }


def _run_steps(arch, static: bool, components: str):
    """4 optimizer steps over two bucket shapes; returns per step (loss, logs), the final LoRA weights, γ."""
    args = setup_parser().parse_args(["--apt", "--cache_latents", "--apt_components", components,
                                      "--apt_gamma_temperature", "1000"])
    model = build_tiny_model(arch)
    network = LoRANetwork(model, lora_dim=4, alpha=4.0)
    network.apply_to()
    with torch.no_grad():  # nonzero LoRA: the fine-tuned pass differs from the prior from the first step
        for i, lora in enumerate(network.loras):
            lora.lora_up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    accelerator = Accelerator(cpu=True)
    apt = APT(args, model, accelerator.device)
    if static:
        apt.enable_static_prior(model, "no", "cpu", backend="eager")
    ctx = train_apt_lora.TrainContext(args, accelerator, model, network, torch.float32, torch.float32, None, apt)
    opt = torch.optim.AdamW(network.parameters(), lr=1e-2)
    out = []
    for step, (bsz, h, w) in enumerate([(2, 8, 8), (1, 8, 12), (2, 8, 8), (1, 8, 12)]):
        torch.manual_seed(100 + step)  # t, noise and augmentation draws: the same in both runs
        loss, logs = train_apt_lora.training_step(args, ctx, _batch(bsz, h, w, seed=step))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((loss.item(), {k: float(v) for k, v in logs.items()}))
    weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
    recordings = len(apt.static_prior) if static else 0
    return out, weights, apt.indicator.gamma().clone(), recordings


@pytest.mark.parametrize("arch,components", [("sd1", "ata,rs,aa"), ("sdxl", "ata,rs,aa"), ("sd1", "ata")])
def test_apt_steps_through_static_prior_equal_eager(arch, components):
    """Loss, every logged APT term, the trained LoRA weights and γ after 4 steps over two bucket shapes agree with
    the eager prior pass to 1e-6 (relative; CPU kernels may round differently with another memory placement)."""
    eager, w_eager, g_eager, _ = _run_steps(arch, False, components)
    static, w_static, g_static, recordings = _run_steps(arch, True, components)
    assert recordings == 2  # one per bucket shape, reused on the later steps
    for (l0, logs0), (l1, logs1) in zip(eager, static):
        assert l1 == pytest.approx(l0, rel=1e-6, abs=1e-9)
        assert logs0.keys() == logs1.keys()
        for k in logs0:
            assert logs1[k] == pytest.approx(logs0[k], rel=1e-6, abs=1e-9), k
    for k in w_eager:
        torch.testing.assert_close(w_static[k], w_eager[k], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_static, g_eager, rtol=1e-6, atol=1e-8)
    assert eager[0][0] != eager[2][0]  # the steps differ: a stale replay would show


def test_cuda_graph_flag_errors(tmp_path, capsys):
    base = ["--pretrained_model_name_or_path", str(tmp_path / "nomodel"), "--train_data_dir", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), "--apt_cuda_graph"]
    assert train_apt_lora.main(base) == 2
    assert "--apt_cuda_graph speeds up APT's prior pass: it needs --apt" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train_apt_lora.main(base + ["--apt"]) == 2
        assert "--apt_cuda_graph needs a CUDA device" in capsys.readouterr().err
