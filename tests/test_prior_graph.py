"""The prior pass on static buffers (apt_ext/prior_graph.py, --apt_cuda_graph): the replay data flow, and APT steps
through it equal to the eager steps. The CUDA recording itself needs a GPU (bench/gpu_check.sh); on the CPU the
"eager" backend runs the same buffers, copies and per-shape recordings."""
import pytest
import torch

import train_apt_lora
from apt_ext.prior_graph import StaticPass, signature
from bench.prior_graph_check import compare, run_steps
from library.tiny_models import build_tiny_model


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


def test_the_first_call_keeps_its_inputs_and_outputs_the_callers_own():
    """The recording call's outputs are the caller's own, like every replay's, and so is its input: the next call
    of the same shape copies into the static buffers and overwrites the static outputs. A step's x_t and prior pass
    kept past it (--apt_prior_ahead queues the next step's prior pass before this step's backward) must keep their
    values, else APT's loss and backward would use the next step's."""
    sp = StaticPass(lambda x: [x * 2], backend="eager")
    x1 = torch.tensor([1.0, 2.0])
    first = sp(x1)  # records
    second = sp(torch.tensor([10.0, 20.0]))  # replays into the same static buffers
    third = sp(torch.tensor([5.0, 6.0]))
    assert first[0].tolist() == [2.0, 4.0] and second[0].tolist() == [20.0, 40.0] and third[0].tolist() == [10.0, 12.0]
    assert x1.tolist() == [1.0, 2.0]


def test_static_pass_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        StaticPass(lambda x: [x], backend="graph")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            StaticPass(lambda x: [x], backend="cuda")


@pytest.mark.parametrize("arch,components", [("sd1", "ata,rs,aa"), ("sdxl", "ata,rs,aa"), ("sd1", "ata")])
def test_apt_steps_through_static_prior_equal_eager(arch, components):
    """Loss, every logged APT term, the trained LoRA weights and γ after 4 steps over two bucket shapes agree with
    the eager prior pass to 1e-6 (relative; CPU kernels may round differently with another memory placement).
    bench/prior_graph_check.py runs the same comparison with CUDA graphs on a GPU."""
    eager = run_steps(build_tiny_model(arch), static=None, components=components)
    static = run_steps(build_tiny_model(arch), static="eager", components=components)
    assert static[3] == 2  # one recording per bucket shape, replayed on the later steps
    diff = compare(eager, static)
    assert set(diff) >= {"loss", "apt/L_theta", "apt/L_phi", "apt/delta_noise", "gradients", "lora weights", "gamma"}
    assert all(v <= 1e-6 for v in diff.values()), diff
    losses = [step[0] for step in eager[0]]
    assert losses[0] != losses[2]  # the steps differ: a stale replay would show


def test_cuda_graph_flag_errors(tmp_path, capsys):
    base = ["--pretrained_model_name_or_path", str(tmp_path / "nomodel"), "--train_data_dir", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), "--apt_cuda_graph"]
    assert train_apt_lora.main(base) == 2
    assert "--apt_cuda_graph speeds up APT's prior pass: it needs --apt" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train_apt_lora.main(base + ["--apt"]) == 2
        assert "--apt_cuda_graph needs a CUDA device" in capsys.readouterr().err
