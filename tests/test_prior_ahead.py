"""--apt_prior_ahead (issue 6): step k+1's inputs and prior pass are prepared during step k, before its backward.

What must hold: the same run bit for bit (every draw in the same order), the look-ahead really happening (the next
batch's prior pass before this step's backward), an exact resume from a state saved while a step was prepared
ahead (test_apt_step.py::test_resume_is_exact has that mode), and a clear error without APT.
"""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_apt_lora
from apt_ext.prior_ahead import PriorAhead


def _run(world, out, arch="sd1", *extra):
    return train_apt_lora.main(["--pretrained_model_name_or_path", world.model(arch), "--dataset_config",
                                world.dataset, "--output_dir", str(out), "--output_name", "lora",
                                "--network_dim", "4", "--learning_rate", "3e-3", "--seed", "7", "--apt",
                                "--apt_gamma_temperature", "1000", *extra])


@pytest.mark.parametrize("arch,extra", [
    ("sd1", ["--max_train_steps", "5"]),  # pixel-space augmentation, an epoch boundary after step 3
    ("sd1", ["--max_train_steps", "3", "--cache_latents", "--gradient_accumulation_steps", "2"]),
    ("sdxl", ["--max_train_steps", "4", "--cache_latents"]),
], ids=["sd1-pixels", "sd1-latents-accumulation", "sdxl-latents"])
def test_the_same_run_bit_for_bit(tiny_world, tmp_path, arch, extra):
    for name, flags in (("sequential", []), ("ahead", ["--apt_prior_ahead"])):
        assert _run(tiny_world, tmp_path / name, arch, *extra, *flags) == 0
    a, b = (load_file(str(tmp_path / n / "lora.safetensors")) for n in ("sequential", "ahead"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(tmp_path / "sequential" / "lora.safetensors"), "pt") as f1, \
            safe_open(str(tmp_path / "ahead" / "lora.safetensors"), "pt") as f2:
        assert f1.metadata()["apt_gamma_final"] == f2.metadata()["apt_gamma_final"]
        assert f1.metadata()["apt_gamma_final"] != "[" + ", ".join(["0.0"] * 10) + "]"  # γ moved: the test can see


def test_the_next_prior_pass_comes_before_this_backward(tiny_world, tmp_path, monkeypatch):
    from accelerate import Accelerator

    import apt_ext.step as step_mod

    events = []
    real_prepare, real_backward = step_mod.prepare_step, Accelerator.backward
    monkeypatch.setattr(step_mod, "prepare_step", lambda args, ctx, batch, apt: (
        events.append("prepare " + batch["image_keys"][0].rsplit("/", 1)[-1]), real_prepare(args, ctx, batch, apt))[1])
    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kw: (events.append("backward"),
                                                                           real_backward(self, loss, **kw))[1])
    assert _run(tiny_world, tmp_path / "ahead", "sd1", "--max_train_steps", "3", "--cache_latents", "--apt_prior_ahead") == 0
    order = [e.split()[0] for e in events]
    # step 1 prepares itself and step 2; steps 2 prepares step 3; step 3 is the epoch's last: nothing ahead
    assert order == ["prepare", "prepare", "backward", "prepare", "backward", "backward"], events
    assert len({e for e in events if e.startswith("prepare")}) == 3  # three different batches
    events.clear()
    assert _run(tiny_world, tmp_path / "sequential", "sd1", "--max_train_steps", "3", "--cache_latents") == 0
    assert [e.split()[0] for e in events] == ["prepare", "backward"] * 3


def test_take_hands_over_only_the_prepared_batch_and_rewind_restores_the_generators():
    ahead = PriorAhead("cpu")
    batch, other = {"k": 1}, {"k": 1}
    before = torch.get_rng_state()
    ahead.start(batch, lambda: torch.rand(3))
    drawn = ahead.take(batch)
    assert drawn.shape == (3,) and ahead.take(batch) is None  # handed over once
    mid = torch.get_rng_state()
    ahead.start(batch, lambda: torch.rand(3))
    assert not torch.equal(torch.get_rng_state(), mid)
    assert ahead.take(other) is None  # an equal dict is not the same batch: rewound, prepared again by the step
    assert torch.equal(torch.get_rng_state(), mid)  # the generator stands where it was before that start
    torch.set_rng_state(before)
    ahead.start(batch, lambda: torch.rand(3))
    ahead.rewind()
    assert torch.equal(torch.get_rng_state(), before) and ahead.take(batch) is None


def test_without_apt_is_refused(tiny_world, tmp_path, capsys):
    rc = train_apt_lora.main(["--pretrained_model_name_or_path", tiny_world.model("sd1"), "--dataset_config",
                              tiny_world.dataset, "--output_dir", str(tmp_path / "o"), "--apt_prior_ahead"])
    assert rc == 2 and "--apt_prior_ahead runs APT's prior pass a step ahead: it needs --apt" in capsys.readouterr().err


def test_the_graph_check_has_an_ahead_variant(capsys):
    """bench/prior_graph_check.py `ahead` (what a GPU session runs to check the side stream): on the CPU the
    eager replay backend, the same steps as eager within the fp32 tolerance."""
    from bench import prior_graph_check

    assert prior_graph_check.main(["--configs", "tiny-sd1", "--variants", "ahead", "--steps", "3"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| tiny-sd1")]
    assert len(rows) == 1 and "prior pass a step ahead" in rows[0] and rows[0].rstrip().endswith("✓ |")
