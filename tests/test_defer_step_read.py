"""--defer_step_read (issue 6): a NaN/inf update dropped on the device, each step read back one step later.

The window's end then reads nothing: the fused optimizer skips the update itself (`found_inf`), and what the
trainer shows (loss, logs, the NaN warning) is read from a copy one step later. The updates must be exactly those
of the path that reads at once, and only the step count differs: a dropped update still counts as a step.
"""
import logging
from types import SimpleNamespace

import pytest
import torch

import train_apt_lora
from library.optimizers import defer_step_read
from library.train_util import TrainingSetupError


def _ctx(defer, fp16=False, fused=True):
    """A one-layer network under a CPU accelerator. `fp16`: accelerate gives no GradScaler on a CPU, so torch's CPU
    GradScaler takes its place (as accelerate's own on CUDA: loss scaled in backward, unscaled by clipping, the step
    through it)."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    accelerator = Accelerator(cpu=True)
    if fp16:
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    ctx = SimpleNamespace(accelerator=accelerator, network=net, window_losses=[], window_keys=[],
                          keep_grads=False, defer_read=defer)
    opt = ctx.accelerator.prepare(torch.optim.AdamW(net.parameters(), lr=0.1, fused=fused))
    if fp16:
        accelerator.unscale_gradients = lambda optimizer=None: accelerator.scaler.unscale_(opt.optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return ctx, net, opt, sched


X = torch.tensor([[1.0, 2.0, 3.0]])


def _step(kind):
    """A step function: "good", "nan_loss" (loss and gradients NaN), "nan_const" (NaN loss, finite gradients),
    "inf_grad" (finite loss, NaN gradients)."""

    def step(args, ctx, batch):
        net = ctx.network
        loss = (net(X) ** 2).mean()
        if kind == "nan_loss":
            loss = loss * float("nan")
        elif kind == "nan_const":  # a NaN that no gradient sees: the loss is NaN, the gradients finite
            loss = loss + torch.tensor(float("nan"))
        elif kind == "inf_grad":
            loss = loss + (net.weight.sum() - net.weight.sum().detach()).abs().sqrt()  # 0, gradient 0 * inf
        return loss, {"double": loss * 2}

    return step


KINDS = ["good", "nan_loss", "good", "inf_grad", "good"]


def _run(defer, fp16=False, kinds=KINDS, fused=True):
    ctx, net, opt, sched = _ctx(defer, fp16, fused)
    results = [train_apt_lora.micro_batch(SimpleNamespace(max_grad_norm=1.0), ctx, {"image_keys": [f"img{i}"]}, opt,
                                          sched, list(net.parameters()), _step(kind), read=("double",))
               for i, kind in enumerate(kinds)]
    return results, net, opt.optimizer, sched, ctx.accelerator.scaler


def test_deferred_updates_equal_the_read_at_once_path_and_a_dropped_one_counts():
    eager, net_e, opt_e, sched_e, _ = _run(False)
    deferred, net_d, opt_d, sched_d, _ = _run(True)
    assert [r.status for r in eager] == ["stepped", "skipped", "stepped", "skipped", "stepped"]
    assert [r.status for r in deferred] == ["queued"] * 5 and all(r.values is None for r in deferred)
    assert [r.read.skipped for r in deferred] == [False, True, False, True, False]
    assert torch.equal(net_e.weight, net_d.weight) and torch.equal(net_e.bias, net_d.bias)
    assert not torch.equal(net_d.weight, _ctx(False)[1].weight)  # and it did train
    for p_e, p_d in zip(net_e.parameters(), net_d.parameters()):
        s_e, s_d = opt_e.state[p_e], opt_d.state[p_d]
        assert float(s_e["step"]) == float(s_d["step"]) == 3  # the two dropped updates left no trace
        assert torch.equal(s_e["exp_avg"], s_d["exp_avg"]) and torch.equal(s_e["exp_avg_sq"], s_d["exp_avg_sq"])
    assert sched_e.last_epoch == 3 and sched_d.last_epoch == 5
    for e, d in zip(eager, deferred):
        if not d.read.skipped:
            assert d.read.values == e.values and d.read.values["double"] == pytest.approx(2 * d.read.values["loss"])
    assert deferred[1].read.warning() == "non-finite loss (images: img1): the step's update was dropped"
    assert deferred[3].read.warning().startswith("non-finite gradients (images: img3)")


def test_fp16_deferred_updates_equal_the_read_at_once_path():
    """fp16: GradScaler skips the overflowing window (inf_grad) in both paths, uncounted as a bad step; the NaN-loss
    windows (NaN gradients, or NaN loss and finite gradients) are dropped on the device too. The weights and Adam state equal the read-at-once path bit for bit (the
    scales are powers of two, so unscaling is exact); what differs is the scale, which the dropped NaN window also
    halves, and the step count."""
    kinds = KINDS + ["nan_const", "good"]
    eager, net_e, opt_e, sched_e, scaler_e = _run(False, True, kinds)
    deferred, net_d, opt_d, sched_d, scaler_d = _run(True, True, kinds)
    assert [r.status for r in eager] == ["stepped", "skipped", "stepped", "stepped", "stepped", "skipped", "stepped"]
    assert [r.read.skipped for r in deferred] == [False, True, False, False, False, True, False]
    assert torch.equal(net_e.weight, net_d.weight) and torch.equal(net_e.bias, net_d.bias)
    assert not torch.equal(net_d.weight, _ctx(False)[1].weight)
    for p_e, p_d in zip(net_e.parameters(), net_d.parameters()):
        s_e, s_d = opt_e.state[p_e], opt_d.state[p_d]
        assert float(s_e["step"]) == float(s_d["step"]) == 4  # the NaN losses and the overflow left no trace
        assert torch.equal(s_e["exp_avg"], s_d["exp_avg"]) and torch.equal(s_e["exp_avg_sq"], s_d["exp_avg_sq"])
    assert sched_e.last_epoch == 5 and sched_d.last_epoch == 7
    assert scaler_e.get_scale() == 8.0 and scaler_d.get_scale() == 2.0


def test_fp16_overflow_skipped_by_the_scaler_on_the_host_does_not_advance_the_schedule():
    """Read at once with an optimizer that takes no found_inf (here AdamW with foreach), GradScaler decides on the
    host and does not call the step: the learning-rate schedule waits, as accelerate's scheduler does in
    sd-scripts. With a fused optimizer the step is called with found_inf (no read) and the schedule advances."""
    kinds = ["good", "inf_grad", "good"]
    foreach, net_f, opt_f, sched_f, scaler_f = _run(False, True, kinds, fused=False)
    assert [r.status for r in foreach] == ["stepped"] * 3
    assert all(float(opt_f.state[p]["step"]) == 2 for p in net_f.parameters())
    assert sched_f.last_epoch == 2 and scaler_f.get_scale() == 8.0
    fused, net_u, opt_u, sched_u, _ = _run(False, True, kinds, fused=True)
    assert all(float(opt_u.state[p]["step"]) == 2 for p in net_u.parameters())
    assert sched_u.last_epoch == 3
    assert torch.allclose(net_f.weight, net_u.weight, atol=1e-6)  # the same updates either way


@pytest.mark.parametrize("fp16", [False, True])
def test_the_deferred_window_end_reads_nothing(monkeypatch, fp16):
    ctx, net, opt, sched = _ctx(True, fp16)
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real: (reads.append(_n), _r(self, *a))[1])
    res = train_apt_lora.micro_batch(SimpleNamespace(max_grad_norm=1.0), ctx, {"image_keys": ["a"]}, opt, sched,
                                     list(net.parameters()), _step("good"), read=("double",))
    assert reads == [] and res.status == "queued"
    loss = res.read.values["loss"]
    assert reads == ["tolist"]  # one copy, read when asked
    monkeypatch.undo()
    with torch.no_grad():
        assert res.read.values["loss"] == loss == pytest.approx(float((_ctx(False)[1](X) ** 2).mean()))


def test_which_runs_defer():
    fused = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], fused=True)
    foreach = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    args = lambda mode, mp="no": SimpleNamespace(defer_step_read=mode, mixed_precision=mp)  # noqa: E731
    wrapped = SimpleNamespace(optimizer=fused)  # as accelerate's AcceleratedOptimizer
    assert defer_step_read(args("auto"), fused, "cuda") and defer_step_read(args("auto"), wrapped, "cuda")
    assert not defer_step_read(args("auto"), fused, "cpu")  # nothing to wait for on a CPU
    assert defer_step_read(args("on"), fused, "cpu") and not defer_step_read(args("off"), fused, "cuda")
    assert not defer_step_read(args("auto"), foreach, "cuda") and defer_step_read(args("auto", "fp16"), fused, "cuda")
    with pytest.raises(TrainingSetupError, match=r"--defer_step_read on: AdamW cannot skip .*fused=True"):
        defer_step_read(args("on"), foreach, "cpu")


def _train(world, out, *extra):
    return train_apt_lora.main(["--pretrained_model_name_or_path", world.model("sd1"), "--dataset_config",
                                world.dataset, "--output_dir", str(out), "--output_name", "lora",
                                "--network_dim", "4", "--max_train_steps", "3", "--learning_rate", "1e-2", "--seed", "1",
                                "--optimizer_args", "fused=True", *extra])


@pytest.mark.parametrize("accumulation", ["1", "2"])
def test_trainer_logs_each_step_under_its_own_number_and_trains_the_same(tb_scalars, tiny_world, tmp_path, accumulation):
    """APT with --log_with tensorboard: read one step later, every step is logged under its own number with the
    same loss, γ, per-bin indicator logs and lr as when read at once, and the LoRA is the same bit for bit (also
    when a step accumulates two micro-batches)."""
    from safetensors.torch import load_file

    runs = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        assert _train(tiny_world, out, "--apt", "--log_with", "tensorboard", "--logging_dir", str(out / "logs"),
                      "--defer_step_read", mode, "--lr_scheduler", "linear",
                      "--gradient_accumulation_steps", accumulation) == 0
        runs[mode] = (tb_scalars(out / "logs"), load_file(str(out / "lora.safetensors")))
    (logs_off, lora_off), (logs_on, lora_on) = runs["off"], runs["on"]
    assert logs_on == logs_off
    assert [s for s, _ in logs_on["loss/current"]] == [1, 2, 3]
    # sd-scripts' loss/epoch_average: the mean step loss of each epoch at its last step (3 batches: one epoch of 3
    # steps, or with 2 micro-batches a step, epochs of steps 1-2 and 3); deferred, the last step's read comes first
    loss = dict(logs_on["loss/current"])
    epochs = [[1, 2, 3]] if accumulation == "1" else [[1, 2], [3]]
    assert [s for s, _ in logs_on["loss/epoch_average"]] == [e[-1] for e in epochs]
    for (_, value), e in zip(logs_on["loss/epoch_average"], epochs):
        assert value == pytest.approx(sum(loss[i] for i in e) / len(e), rel=1e-6)
    assert any(k.startswith("apt/gamma_bin") for k in logs_on) and "apt/gamma_seen_mean" in logs_on
    assert any(k.startswith("lr/") for k in logs_on)
    assert lora_on.keys() == lora_off.keys() and all(torch.equal(lora_on[k], lora_off[k]) for k in lora_on)


def test_scale_weight_norms_in_both_modes(tb_scalars, tiny_world, tmp_path, capsys):
    """--scale_weight_norms caps every saved LoRA's ΔW norm, its counts are logged (max_norm/*, and on the progress
    bar) under each step's number, and a deferred run equals one read at once."""
    from safetensors.torch import load_file

    runs = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        assert _train(tiny_world, out, "--scale_weight_norms", "0.02", "--log_with", "tensorboard",
                      "--logging_dir", str(out / "logs"), "--defer_step_read", mode) == 0
        runs[mode] = (tb_scalars(out / "logs"), load_file(str(out / "lora.safetensors")))
        assert "keys_scaled=" in capsys.readouterr().err
    (logs_off, lora_off), (logs_on, lora_on) = runs["off"], runs["on"]
    assert logs_on == logs_off and all(torch.equal(lora_on[k], lora_off[k]) for k in lora_on)
    assert [s for s, _ in logs_on["max_norm/keys_scaled"]] == [1, 2, 3]
    assert logs_on["max_norm/keys_scaled"][-1][1] > 0 and logs_on["max_norm/max_key_norm"][-1][1] <= 0.02 * 1.0001
    for key in [k for k in lora_on if k.endswith("lora_down.weight")]:
        up, down = lora_on[key.replace("lora_down", "lora_up")], lora_on[key]
        scale = float(lora_on[key.replace("lora_down.weight", "alpha")]) / down.shape[0]
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * scale
        assert float(delta.norm()) <= 0.02 * 1.0001


def test_trainer_warns_a_step_late_counts_the_dropped_step_and_stops(tiny_world, tmp_path, nan_steps, caplog, capsys):
    from safetensors import safe_open

    calls = nan_steps(lambda n: n == 2)
    with caplog.at_level(logging.WARNING, logger="apt_lora"):
        assert _train(tiny_world, tmp_path / "out", "--defer_step_read", "on") == 0
    assert calls["n"] == 3  # the dropped update counted as one of the 3 steps
    warned = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("non-finite loss (images: ") and ".png" in warned[0]
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "3" and all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())

    nan_steps(lambda n: True)
    rc = _train(tiny_world, tmp_path / "out2", "--defer_step_read", "on", "--max_bad_steps", "2", "--max_train_steps", "9")
    err = capsys.readouterr().err
    assert rc == 2 and "--max_bad_steps 2" in err and "learning rate" in err


def test_a_dropped_last_step_is_still_reported(tiny_world, tmp_path, nan_steps, caplog):
    """Read one step later, the last step's read has no next step to come with: it is shown once the loop ends.
    A NaN in the last of 3 steps (no --log_with, so no epoch-end flush shows it) must still warn exactly once, or
    the user never learns that the saved LoRA lacks that update."""
    calls = nan_steps(lambda n: n == 3)
    with caplog.at_level(logging.WARNING, logger="apt_lora"):
        assert _train(tiny_world, tmp_path / "out", "--defer_step_read", "on") == 0
    assert calls["n"] == 3
    warned = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("non-finite loss (images: "), warned


def test_on_with_an_optimizer_that_cannot_skip_is_refused(tiny_world, tmp_path, capsys):
    rc = train_apt_lora.main(["--pretrained_model_name_or_path", tiny_world.model("sd1"), "--dataset_config",
                              tiny_world.dataset, "--output_dir", str(tmp_path / "o"), "--defer_step_read", "on"])
    err = capsys.readouterr().err
    assert rc == 2 and "--defer_step_read on: AdamW cannot skip an update on the device" in err and "fused=True" in err
