"""The training step's UNet forward and backward from CUDA graphs (library/unet_graph.py, --unet_cuda_graph): the
per-shape bookkeeping, the outputs and gradients, whole APT and plain steps through it equal to the eager ones,
the gradients kept under accumulation, and the flag's errors. The CUDA recording itself
(`torch.cuda.make_graphed_callables`) needs a GPU: bench/prior_graph_check.py --configs sd15,sdxl checks it there."""
from types import SimpleNamespace

import pytest
import torch

import train_apt_lora
from bench.prior_graph_check import compare, run_steps
from library.tiny_models import build_tiny_model
from library.unet_graph import GraphedPass


def test_graphed_unet_records_per_shape_passes_gradients_and_falls_back_beyond_max():
    w = torch.nn.Parameter(torch.tensor([1.5, -2.0]))
    frozen = torch.nn.Parameter(torch.tensor(3.0), requires_grad=False)
    seen = []

    def fn(x, bias, scale):
        seen.append((tuple(x.shape), bias is None))
        y = x * w * frozen + (0 if bias is None else bias)
        return [y * scale, y.sum(dim=-1)]

    g = GraphedPass(fn, [w, frozen], backend="eager", max_graphs=2)
    assert g.params == [w]  # only what trains
    x = torch.ones(3, 2)
    out = g(x, None, torch.tensor(2.0))
    assert torch.equal(out[0], 2 * 3 * x * w.detach()) and len(g) == 1 and seen[-1] == ((3, 2), True)
    (out[0].sum() + out[1].sum()).backward()
    assert torch.equal(w.grad, torch.tensor([(2 * 3 + 3) * 3.0] * 2))  # d/dw of sum(6 x w) + sum(3 x w) over 3 rows
    g(torch.ones(3, 2), torch.zeros(2), torch.tensor(1.0))  # same shapes, a bias now: another signature
    assert len(g) == 2 and seen[-1] == ((3, 2), False)
    g(torch.ones(5, 2), None, torch.tensor(1.0))  # a third shape: past max_graphs, runs as is
    assert len(g) == 2 and g.eager_calls == 1
    with pytest.raises(ValueError, match="backend must be one of"):
        GraphedPass(fn, [w], backend="graph")
    with pytest.raises(ValueError, match="max_graphs must be at least 1"):
        GraphedPass(fn, [w], backend="eager", max_graphs=0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            GraphedPass(fn, [w], backend="cuda")


def test_graphed_unet_records_a_new_shape_only_while_memory_allows(caplog):
    """A recording keeps its activations: a new shape is recorded while the memory available holds twice the
    largest recording (the new one, and room for the passes without one); else it runs eagerly, with a warning
    that says how much each needs. Memory is faked here: each call of `fn` "holds" 30 bytes."""
    w = torch.nn.Parameter(torch.tensor([2.0]))
    mem = {"allocated": 0, "available": 100}

    def fn(x):
        mem["allocated"] += 30
        return [x * w]

    g = GraphedPass(fn, [w], backend="eager", max_graphs=5, memory=lambda: (mem["allocated"], mem["available"]))
    g(torch.ones(1))
    assert len(g) == 1 and g.cost == 30
    g(torch.ones(2))  # 100 available >= 2 x 30
    assert len(g) == 2 and g.eager_calls == 0
    mem["available"] = 59
    with caplog.at_level("WARNING", logger="library.unet_graph"):
        out = g(torch.ones(3))
    assert len(g) == 2 and g.eager_calls == 1 and torch.equal(out[0], torch.full((3,), 2.0))
    assert "runs without a CUDA graph: a recording holds ~0.0 GiB and 0.0 GiB is available (needed: 2x" in caplog.text
    mem["available"] = 60
    g(torch.ones(4))
    assert len(g) == 3  # room again
    g(torch.ones(2))  # a recorded shape replays whatever the memory
    assert len(g) == 3 and g.eager_calls == 1


def test_a_smaller_recording_does_not_lower_the_memory_a_recording_needs():
    """The memory check uses the LARGEST recording so far: a small bucket recorded after a large one must not let
    a third shape record when the memory only holds the small one twice (a large bucket recorded then runs the GPU
    out of memory mid-run). Faked memory: the first shape holds 30 bytes, the second 10, the third would hold 30."""
    w = torch.nn.Parameter(torch.tensor([2.0]))
    mem = {"allocated": 0, "available": 1000}
    held = {1: 30, 2: 10, 3: 30}

    def fn(x):
        mem["allocated"] += held[x.shape[0]]
        return [x * w]

    g = GraphedPass(fn, [w], backend="eager", max_graphs=5, memory=lambda: (mem["allocated"], mem["available"]))
    g(torch.ones(1))
    g(torch.ones(2))
    assert len(g) == 2 and g.cost == 30  # max(30, 10)
    mem["available"] = 59  # holds 2 x 10 but not 2 x 30
    out = g(torch.ones(3))
    assert len(g) == 2 and g.eager_calls == 1 and out[0].tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("arch,components,te", [("sd1", "ata,rs,aa", False), ("sdxl", "ata,rs,aa", False),
                                                 ("sd1", "none", False), ("sdxl", "ata,rs,aa", True)])
def test_apt_steps_through_the_unet_graph_equal_eager(arch, components, te):
    """Loss, every logged APT term (the capture record comes back as graph outputs), the LoRA gradients, the trained
    LoRA weights and γ after 4 steps over two bucket shapes equal the eager steps; `te`: the text encoders' pass
    recorded too (the prior pass encodes c without grad, eagerly; c* goes through the recording)."""
    eager = run_steps(build_tiny_model(arch), static=None, components=components)
    graphed = run_steps(build_tiny_model(arch), static="eager", unet_graph="eager", components=components,
                        te_graph="eager" if te else None)
    assert graphed[3] == 2
    diff = compare(eager, graphed)
    assert all(v <= 1e-6 for v in diff.values()), diff
    if components != "none":
        assert eager[0][0][1]["apt/L_attn"] > 0  # the alignment terms are computed from the returned maps


@pytest.mark.parametrize("arch,accumulation,flags,base", [
    ("sd1", 1, ["--unet_cuda_graph"], []), ("sd1", 2, ["--unet_cuda_graph"], []),
    ("sd1", 2, ["--text_encoder_cuda_graph"], []), ("sdxl", 1, ["--unet_cuda_graph", "--text_encoder_cuda_graph"], []),
    ("sdxl", 2, ["--unet_cuda_graph", "--text_encoder_cuda_graph"], []),
    ("sd1", 1, ["--unet_cuda_graph", "--text_encoder_cuda_graph"], ["--network_train_text_encoder_only"])])
def test_plain_trainer_steps_through_the_graphs_equal_eager(arch, accumulation, flags, base):
    """The trainer's own loop body (micro_batch: backward, clipping, AdamW) with and without the graph paths (UNet,
    text encoders with their LoRA training, both: the context's gradient flows from one recording into the other,
    also through a UNet without LoRA); with gradient accumulation the gradients stay allocated between windows
    (zeroed, not freed)."""
    from bench.common import build_step_fn, make_batch, make_bench_args

    results = []
    for graph in (False, True):
        model = build_tiny_model(arch)
        extra = ["--gradient_accumulation_steps", str(accumulation)] + base + (flags if graph else [])
        args = make_bench_args(rank=4, extra=extra)
        torch.manual_seed(0)
        bench = build_step_fn(model, args, device="cpu", batch=make_batch(model, 2, resolution=64))
        assert (bench.ctx.unet_graph is not None) == (graph and "--unet_cuda_graph" in flags)
        assert (bench.ctx.te_graph is not None) == (graph and "--text_encoder_cuda_graph" in flags)
        assert any(lora.lora_name.startswith("lora_te") for lora in bench.network.loras)  # the text encoders train
        assert bool(bench.network.unet_loras) == ("--network_train_text_encoder_only" not in base)
        grads_before = [p.grad for p in bench.trainable]
        start = [p.detach().clone() for p in bench.trainable]
        losses = []
        for i in range(3):
            torch.manual_seed(10 + i)
            losses.append(bench.step_fn())
        if graph and accumulation > 1:
            assert bench.ctx.keep_grads
            assert all(g is not None and p.grad is g for g, p in zip(grads_before, bench.trainable))
            assert all(float(p.grad.abs().sum()) == 0 for p in bench.trainable)  # zeroed after the window
        else:
            assert not bench.ctx.keep_grads and all(p.grad is None for p in bench.trainable)
        results.append((losses, [p.detach().clone() for p in bench.trainable]))
    (l0, w0), (l1, w1) = results
    if graph and "--text_encoder_cuda_graph" in flags:  # its recordings ran (one shape), fed by each step's captions
        assert len(bench.ctx.te_graph) == 1
    assert l0 == pytest.approx(l1, rel=1e-6)
    # A LoRA on a layer whose output nothing reads (SDXL's TE1 last layer: the context is hidden_states[-2]) gets no
    # gradient. Eagerly its gradient stays None and AdamW skips it; kept gradients are zeros, so AdamW's weight decay
    # shrinks its down weights. Its up weights stay exactly 0 either way, so the LoRA is the same (docs/speed.md).
    unused = [torch.equal(a, b) for a, b in zip(w0, start)]
    names = [n for n, p in bench.network.named_parameters() if p.requires_grad]
    assert not any(unused) or (arch == "sdxl" and all("lora_te1" in n for n, u in zip(names, unused) if u))
    assert all(torch.count_nonzero(w) == 0 for n, w, u in zip(names, w1, unused) if u and "lora_up" in n)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b, u in zip(w0, w1, unused) if not u)
    assert l0[0] != l0[2]


def test_unet_graph_refuses_lora_dropout():
    from bench.common import build_step_fn, make_bench_args

    model = build_tiny_model("sd1")
    args = make_bench_args(rank=4, extra=["--network_dropout", "0.1", "--unet_cuda_graph"])
    with pytest.raises(ValueError, match="--unet_cuda_graph: LoRA dropout is drawn per call"):
        build_step_fn(model, args, device="cpu")


def test_unet_cuda_graph_max_reaches_both_recordings():
    """--unet_cuda_graph_max is how many bucket shapes the UNet's and the text encoders' recordings keep (default 2,
    docs/cli.md): a user with more buckets raises it to record them all, lowers it to save GPU memory."""
    from bench.common import build_step_fn, make_bench_args

    flags = ["--unet_cuda_graph", "--text_encoder_cuda_graph"]
    assert make_bench_args(extra=flags).unet_cuda_graph_max == 2
    args = make_bench_args(rank=4, extra=flags + ["--unet_cuda_graph_max", "3"])
    bench = build_step_fn(build_tiny_model("sd1"), args, device="cpu")
    assert bench.ctx.unet_graph.max_graphs == 3 and bench.ctx.te_graph.max_graphs == 3


def test_unet_graph_flag_errors(tmp_path, capsys):
    base = ["--pretrained_model_name_or_path", str(tmp_path / "nomodel"), "--train_data_dir", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), "--unet_cuda_graph"]
    assert train_apt_lora.main(base + ["--gradient_checkpointing"]) == 2
    assert "--unet_cuda_graph cannot be combined with --gradient_checkpointing" in capsys.readouterr().err
    assert train_apt_lora.main(base + ["--unet_cuda_graph_max", "0"]) == 2
    assert "--unet_cuda_graph_max must be at least 1, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train_apt_lora.main(base) == 2
        assert "--unet_cuda_graph needs a CUDA device" in capsys.readouterr().err
    te = base[:-1] + ["--text_encoder_cuda_graph"]
    assert train_apt_lora.main(te + ["--gradient_checkpointing"]) == 2
    assert "--text_encoder_cuda_graph cannot be combined with --gradient_checkpointing" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train_apt_lora.main(te + ["--network_train_unet_only"]) == 2
        assert "--text_encoder_cuda_graph needs a CUDA device" in capsys.readouterr().err


def test_text_encoder_graph_setup_errors(monkeypatch, tmp_path, capsys):
    """Nothing to record with frozen text encoders, and no recording of a per-call dropout draw: both named."""
    from bench.common import build_step_fn, make_bench_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # verify_args' device check passed
    base = ["--pretrained_model_name_or_path", str(tmp_path / "nomodel"), "--train_data_dir", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), "--text_encoder_cuda_graph", "--network_train_unet_only"]
    assert train_apt_lora.main(base) == 2
    assert ("--text_encoder_cuda_graph: no text-encoder LoRA trains (--network_train_unet_only), so there is no "
            "training pass to record: leave the flag out") in capsys.readouterr().err
    monkeypatch.undo()
    model = build_tiny_model("sd1")
    with pytest.raises(ValueError, match="--text_encoder_cuda_graph: no text-encoder LoRA trains"):
        build_step_fn(model, make_bench_args(rank=4, extra=["--network_train_unet_only", "--text_encoder_cuda_graph"]),
                      device="cpu")
    model = build_tiny_model("sd1")
    with pytest.raises(ValueError, match="--text_encoder_cuda_graph: LoRA dropout is drawn per call"):
        build_step_fn(model, make_bench_args(rank=4, extra=["--network_dropout", "0.1", "--text_encoder_cuda_graph"]),
                      device="cpu")


def test_micro_batch_zeroes_instead_of_freeing_kept_gradients():
    """keep_grads: zero_grad(set_to_none=False), so the next window's backward adds into the same tensors."""
    from accelerate import Accelerator

    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    grads = [p.grad for p in net.parameters()]
    ctx = SimpleNamespace(accelerator=Accelerator(cpu=True), network=net, window_losses=[], window_keys=[],
                          keep_grads=True)
    step = lambda args, ctx, batch: (net(torch.ones(2, 3)).sum(), {})  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train_apt_lora.micro_batch(SimpleNamespace(max_grad_norm=0.0), ctx, {"image_keys": ["a"]}, opt, sched,
                               list(net.parameters()), step)
    assert all(p.grad is g and float(g.abs().sum()) == 0 for p, g in zip(net.parameters(), grads))


def test_channels_last_unet_trains_like_the_default_layout():
    """--channels_last changes the memory layout of the UNet's conv weights, not the numbers: the APT loss and the
    LoRA gradients of one step agree to fp32 rounding (CPU). (Weights after AdamW steps are not compared: Adam
    turns a rounding-level gradient into a full-size step.)"""
    from bench.common import build_step_fn, make_batch, make_bench_args

    results = []
    for flag in ([], ["--channels_last"]):
        model = build_tiny_model("sd1")
        args = make_bench_args(rank=4, extra=["--apt"] + flag)
        bench = build_step_fn(model, args, device="cpu", batch=make_batch(model, 2, resolution=64))
        w = model.unet.conv_in.weight
        assert w.is_contiguous(memory_format=torch.channels_last) == bool(flag) and (not flag or not w.is_contiguous())
        with torch.no_grad():
            for i, lora in enumerate(bench.network.loras):  # nonzero up weights: every gradient is nonzero
                lora.lora_up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
        torch.manual_seed(10)
        loss, _ = train_apt_lora.training_step(args, bench.ctx, bench.batch)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in bench.trainable]))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-5)
    scale = max(float(g.abs().max()) for g in g0)  # mid-block self-attention over one token: q/k gradients are 0
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-6 * scale) for a, b in zip(g0, g1))


def test_the_recorded_module_meets_make_graphed_callables_preconditions():
    """What torch.cuda.make_graphed_callables asserts before it records (it needs CUDA, so it cannot run here): no
    hooks on the module, no buffer requiring grad, tensors only as sample args; and its `parameters()` (the
    gradients it returns) are exactly the trainable LoRA parameters, the same objects, so AdamW's in-place updates
    are what the replays read."""
    from library.unet_graph import _Call

    model = build_tiny_model("sd1")
    from networks.lora import LoRANetwork

    net = LoRANetwork(model, lora_dim=4, alpha=4.0)
    net.apply_to()
    trainable = [p for p in net.parameters() if p.requires_grad]
    g = GraphedPass(lambda *xs: [xs[0] * 2], trainable + [torch.nn.Parameter(torch.ones(1), requires_grad=False)],
                    backend="eager")
    module = g.module_for((torch.ones(1, 4, 8, 8), torch.tensor([1]), torch.ones(1, 77, 32), None, None))
    assert isinstance(module, _Call) and module.none_mask == (False, False, False, True, True)
    assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
    assert all(not b.requires_grad for b in module.buffers())
    assert [id(p) for p in module.parameters()] == [id(p) for p in trainable]
    net.restore()


def test_replay_buffers_alias_like_a_recording_and_keep_grads_is_what_makes_accumulation_right():
    """The "eager" backend keeps a recording's memory: outputs are overwritten by the next call, and a freed `.grad`
    adopts the gradient buffer, which the next backward overwrites. Accumulating two micro-batches into freed
    gradients then gives twice the second one's gradient instead of the sum; gradients kept allocated (zeroed, as
    enable_unet_graph does under accumulation) give the sum."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    g = GraphedPass(lambda x: [x * w], [w], backend="eager")
    a = g(torch.tensor([1.0, 1.0]))[0]
    a_before = a.clone()
    b = g(torch.tensor([3.0, 3.0]))[0]
    assert torch.equal(b, torch.tensor([3.0, 6.0])) and torch.equal(a, b) and not torch.equal(a, a_before)

    def accumulate(keep):
        w.grad = torch.zeros_like(w) if keep else None
        for x in (torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])):
            g(x)[0].sum().backward()
        return w.grad.clone()

    assert torch.equal(accumulate(keep=True), torch.tensor([4.0, 4.0]))  # 1 + 3
    assert torch.equal(accumulate(keep=False), torch.tensor([6.0, 6.0]))  # the hazard: 3 + 3


@pytest.mark.parametrize("arch,clip_skip,max_len", [("sd1", 2, 225), ("sdxl", None, 150)])
def test_text_pass_reads_nothing_back_to_the_host(arch, clip_skip, max_len):
    """What --text_encoder_cuda_graph records must not synchronise with the host (a recording fails on it): on the
    meta device every host read raises, so the text encoders' function (CLIP with its causal mask, SDXL's EOS
    pooling, chunk stitching) runs there to the right shapes."""
    from library.conditioning import context_length, tokenize
    from library.unet_graph import text_outputs

    model = build_tiny_model(arch)
    for te in model.text_encoders:
        te.to("meta")
    fn = text_outputs(model, torch.float32, "cpu", clip_skip=clip_skip, max_token_length=max_len)
    ids = [t.to("meta") for t in tokenize(model, ["a photo of sks dog", "a dog"], max_len)]
    out = fn(*ids)
    assert all(t.device.type == "meta" for t in out)
    assert out[0].shape[:2] == (2, context_length(max_len))
    assert len(out) == (2 if arch == "sdxl" else 1)


def test_cuda_graphs_auto_turns_on_what_the_run_can_use():
    """--cuda_graphs auto: each graph flag on where this run allows it, else off with the reason; flags the user set
    stay set."""
    from library.unet_graph import auto_cuda_graphs

    def run(device="cuda", dropout=False, te=True, apt=True, **flags):
        args = SimpleNamespace(gradient_checkpointing=False, unet_cuda_graph=False, text_encoder_cuda_graph=False,
                               apt_cuda_graph=False, torch_compile=False)
        vars(args).update(flags)
        why = auto_cuda_graphs(args, device, dropout, te, apt)
        assert all((w == "") == getattr(args, f) for f, w in why.items())  # on exactly where no reason is given
        return why

    assert run() == {"unet_cuda_graph": "", "text_encoder_cuda_graph": "", "apt_cuda_graph": ""}
    assert set(run(device="cpu").values()) == set(run(device="mps").values()) == {"no CUDA device"}  # Apple's too
    assert run(dropout=True) == {"unet_cuda_graph": "LoRA dropout", "text_encoder_cuda_graph": "LoRA dropout",
                                 "apt_cuda_graph": ""}  # the prior pass runs with the LoRA off
    assert run(gradient_checkpointing=True, apt=False) == {
        "unet_cuda_graph": "--gradient_checkpointing", "text_encoder_cuda_graph": "--gradient_checkpointing",
        "apt_cuda_graph": "APT is off"}
    assert run(te=False)["text_encoder_cuda_graph"] == "no text-encoder LoRA trains"
    assert run(device="cpu", te=False)["text_encoder_cuda_graph"] == "no CUDA device, no text-encoder LoRA trains"
    assert run(device="cpu", unet_cuda_graph=True)["unet_cuda_graph"] == ""  # the user's own flag is left alone
    assert set(run(torch_compile=True).values()) == {"--torch_compile"}


@pytest.mark.parametrize("flag,kw,expected", [
    ("unet_cuda_graph", {}, []),
    ("unet_cuda_graph", {"cuda": False, "gradient_checkpointing": True, "has_dropout": True},
     ["LoRA dropout", "--gradient_checkpointing", "no CUDA device"]),
    ("text_encoder_cuda_graph", {"trains_text_encoder": False}, ["no text-encoder LoRA trains"]),
    ("unet_cuda_graph", {"trains_text_encoder": False}, []),
    ("apt_cuda_graph", {"gradient_checkpointing": True, "has_dropout": True}, []),  # no grad, LoRA off: unaffected
    ("apt_cuda_graph", {"apt_on": False, "cuda": False}, ["APT is off", "no CUDA device"]),
    ("apt_cuda_graph", {"torch_compile": True}, ["--torch_compile"]),
    ("text_encoder_cuda_graph", {"torch_compile": True, "cuda": False}, ["no CUDA device", "--torch_compile"]),
])
def test_graph_blockers_is_the_one_list(flag, kw, expected):
    """What --cuda_graphs auto reports, what the flag checks refuse and what the LoRA check refuses come from here."""
    from library.unet_graph import blocker_message, graph_blockers

    base = dict(cuda=True, apt_on=True, gradient_checkpointing=False, trains_text_encoder=True)
    assert graph_blockers(flag, **{**base, **kw}) == expected
    for reason in expected:  # each names the flag and says what to do
        msg = blocker_message(flag, reason)
        assert msg.startswith(f"--{flag}") and ("leave" in msg or "it needs --apt" in msg), msg


def test_recordings_restrict_only_their_own_thread(monkeypatch):
    """make_graphed_callables records with torch.cuda.graph in CUDA's "global" capture mode, where the data loader's
    pin-memory thread allocating pinned memory mid-recording is an error. `thread_local_capture` makes the
    recordings inside it thread_local; this checks that torch's make_graphed_callables still records through
    `torch.cuda.graph` (else the patch would not reach it) and that the mode arrives, then is put back."""
    import inspect

    from library import unet_graph

    assert "torch.cuda.graph(" in inspect.getsource(torch.cuda.graphs.make_graphed_callables)
    seen = []

    class Recording:  # stands in for torch.cuda.graph (no CUDA here)
        def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
            seen.append(capture_error_mode)

    monkeypatch.setattr(torch.cuda, "graph", Recording)
    with unet_graph.thread_local_capture():
        torch.cuda.graph(None, pool=None)
        # later torch versions' make_graphed_callables pass their own default ("global") on: replaced too
        torch.cuda.graph(None, pool=None, capture_error_mode="global")
        torch.cuda.graph(None, None, None, "global")
    assert seen == ["thread_local"] * 3 and torch.cuda.graph is Recording
    torch.cuda.graph(None)
    assert seen == ["thread_local"] * 3 + ["global"]
