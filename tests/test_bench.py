"""bench/common.py still drives the trainer's step (smoke tests), and bench/apt_overhead.py prints the reference,
plain and APT steps side by side (one tiny CPU run)."""
import math
import os
import re

import pytest
import torch

from bench.common import (CONFIGS, build_bench_model, build_step_fn, make_batch, make_bench_args, markdown_table,
                          time_steps)


def test_bench_step_trains_tiny_sd1_and_reports_time_and_memory():
    model = build_bench_model("sd1", real=False, device="cpu", dtype=torch.float32)
    batch = make_batch(model, batch_size=1, resolution=64)
    assert batch["latents"].shape == (1, 4, 8, 8) and batch["images"] is None and len(batch["captions"]) == 1
    bench = build_step_fn(model, make_bench_args(rank=4), device="cpu", batch=batch)
    ups = [m.lora_up.weight for m in bench.network.unet_loras]
    assert all(u.abs().sum() == 0 for u in ups)  # lora_up starts at zero
    assert math.isfinite(bench.step_fn())
    median_s, peak = time_steps(bench.step_fn, n_warmup=0, n_steps=2, device="cpu")
    assert median_s > 0 and peak >= 0 and len(time_steps.last_times) == 2 and time_steps.last_warmup_times == []
    assert all(u.abs().sum() > 0 for u in ups)  # the optimizer stepped
    assert bench.lora_params == sum(p.numel() for p in bench.network.parameters() if p.requires_grad)

    row = {**vars(CONFIGS["tiny-sd1"]), "grad_ckpt": False, "median_s": median_s, "times_s": [median_s],
           "peak_bytes": peak, "lora_params": bench.lora_params}
    table = markdown_table([row, {"name": "sdxl", "grad_ckpt": [True], "error": "timeout after 240 s"}])
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "tiny-sd1 | CPU | fp32 | 64²" in lines[2] and "error: timeout after 240 s" in lines[3]


def test_bench_step_with_cached_text_encoder_outputs_and_warmup_times():
    """--network_train_unet_only --cache_text_encoder_outputs (apt_overhead --unet_only): the trainer's cache is used."""
    model = build_bench_model("sd1", real=False, device="cpu", dtype=torch.float32)
    args = make_bench_args(rank=4, extra=["--network_train_unet_only", "--cache_text_encoder_outputs"])
    bench = build_step_fn(model, args, device="cpu", batch=make_batch(model, batch_size=1, resolution=64))
    assert bench.ctx.te_cache is not None
    median_s, _ = time_steps(bench.step_fn, n_warmup=1, n_steps=1, device="cpu")
    assert len(bench.ctx.te_cache) >= 1 and len(time_steps.last_warmup_times) == 1 and median_s > 0


def test_bench_step_refuses_what_the_trainer_refuses():
    """A graph with --gradient_checkpointing (apt_overhead's APT_GRAD_CKPT=on beside graph flags) is refused by the
    trainer; the bench recorded and timed it. Now the row is the trainer's error."""
    model = build_bench_model("sd1", real=False, device="cpu", dtype=torch.float32)
    args = make_bench_args(rank=4, extra=["--unet_cuda_graph", "--gradient_checkpointing"])
    with pytest.raises(ValueError, match="--unet_cuda_graph cannot be combined with --gradient_checkpointing"):
        build_step_fn(model, args, device="cpu", batch=make_batch(model, batch_size=1, resolution=64))


# ------------------------------------------------------------------------------------------------ apt_overhead
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_REFERENCE = os.path.join(REPO, "..", "shared", "bench", "reference_step.py")


@pytest.mark.skipif(not os.path.exists(SHARED_REFERENCE), reason="../shared/bench/reference_step.py is not here")
def test_reference_step_is_a_byte_identical_copy():
    """bench/reference_step.py is ../shared/bench/reference_step.py, byte for byte (the GPU machine has no ../shared)."""
    with open(SHARED_REFERENCE, "rb") as f, open(os.path.join(REPO, "bench", "reference_step.py"), "rb") as g:
        assert f.read() == g.read()


def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_apt_overhead_row_flags_the_issue_targets_on_gpu_configs_only():
    from bench import apt_overhead as A

    ref = {"s": 1.0, "peak": 10 * 2**30, "warmup": 2.0}
    cols = {"plain": {"s": 0.39, "peak": 10 * 2**30, "warmup": 30.0}, "APT": {"s": 0.51, "peak": 11.5 * 2**30, "warmup": 61.0}}
    head = _cells(A.table_head(False)[0])
    row = dict(zip(head, _cells(A.table_row("sdxl", 1, False, 1024, ref, cols, True, []))))
    assert row["reference step"] == "1000.0 ms" and row["plain step"] == "390.0 ms" and row["APT peak"] == "11.50 GiB"
    assert row["plain/ref time"] == "0.39 ✓" and row["APT/ref time"] == "0.51 ✗"
    assert row["APT/plain time"] == "1.31 ✗" and row["APT/plain memory"] == "1.15 ✗"
    assert row["plain warm-up"] == "30.00 s ✓" and row["APT warm-up"] == "61.00 s ✗" and row["reference warm-up"] == "2.00 s"
    # batch 4, gradient checkpointing on: no reference targets; APT/plain ones still apply
    row4 = dict(zip(head, _cells(A.table_row("sdxl", 4, True, 1024, ref, cols, True, []))))
    assert row4["APT/ref time"] == "0.51" and row4["plain/ref time"] == "0.39" and row4["APT/plain time"] == "1.31 ✗"
    # CPU configs: numbers, no flags; a failed column shows "-" and its error
    cpu = dict(zip(head, _cells(A.table_row("tiny-sd1", 1, False, 64, None, cols, False, ["reference: boom"]))))
    assert cpu["reference step"] == "-" and cpu["APT/ref time"] == "-" and cpu["APT/plain time"] == "1.31"
    assert cpu["errors"] == "reference: boom"
    fast_head = _cells(A.table_head(True)[0])
    cols_fast = dict(cols, **{"plain (fast)": {"s": 0.2, "peak": 10 * 2**30, "warmup": 20.0},
                              "APT (fast)": {"s": 0.22, "peak": 10.5 * 2**30, "warmup": 40.0}})
    fast = dict(zip(fast_head, _cells(A.table_row("sdxl", 1, False, 1024, ref, cols_fast, True, []))))
    assert fast["plain (fast) step"] == "200.0 ms" and fast["APT (fast) step"] == "220.0 ms"
    assert fast["fast plain/ref time"] == "0.20 ✓" and fast["fast APT/ref time"] == "0.22 ✓"
    assert fast["fast APT/fast plain time"] == "1.10 ✓" and fast["fast APT/fast plain memory"] == "1.05 ✓"
    assert A.REFERENCE == {"sd15": ("SD15", 512), "sdxl": ("SDXL", 1024), "tiny-sd1": ("TINY_15", 64),
                           "tiny-sdxl": ("TINY_XL", 128)}


def test_apt_overhead_prints_reference_plain_and_apt_side_by_side(tmp_path, capsys):
    """One tiny CPU run (3 worker processes): the reference (bench/reference_step.py, TINY_15), plain and APT steps."""
    from bench import apt_overhead as A

    out = tmp_path / "apt_overhead.md"
    rc = A.main(["--configs", "tiny-sd1", "--steps", "1", "--warmup", "1", "--grad_ckpt", "off", "--batch_sizes", "1",
                 "--threads", "1", "--timeout", "300", "--out", str(out)])
    text = out.read_text()
    assert rc == 0, text
    lines = text.splitlines()
    head = next(ln for ln in lines if ln.startswith("| config |"))
    row = dict(zip(_cells(head), _cells(next(ln for ln in lines if ln.startswith("| tiny-sd1 |")))))
    assert row["batch"] == "1" and row["grad ckpt"] == "off" and row["errors"] == ""
    for col in ("reference step", "plain step", "APT step"):
        assert re.fullmatch(r"\d+\.\d ms", row[col]) and float(row[col].split()[0]) > 0, (col, row[col])
    for col in ("plain peak", "APT peak"):
        assert re.fullmatch(r"[\d,]+ MiB|\d+\.\d\d GiB", row[col]), (col, row[col])
    assert row["reference peak"] == "-"  # reference_step measures no CPU memory
    for col in ("reference warm-up", "plain warm-up", "APT warm-up"):
        assert re.fullmatch(r"-?\d+\.\d\d s", row[col]), (col, row[col])
    for col in ("APT/ref time", "plain/ref time", "APT/plain time", "APT/plain memory"):
        assert re.fullmatch(r"\d+\.\d\d", row[col]), (col, row[col])  # numbers, no ✓/✗ on a CPU config
    assert float(row["APT/plain time"]) == pytest.approx(float(row["APT step"].split()[0]) / float(row["plain step"].split()[0]), abs=0.01)
    assert "TINY_15 at 64 px" in text and "Targets" in text
    assert head in capsys.readouterr().out


def test_op_counter_counts_kernels_not_views():
    from bench.op_count import count_ops

    a = torch.ones(4)
    out, ops = count_ops(lambda: a.add(1).mul(2).view(2, 2).t().contiguous().detach())
    assert dict(ops) == {"aten.add": 1, "aten.mul": 1, "aten.clone": 1}  # view, t, detach: no kernel
    assert torch.equal(out, torch.full((2, 2), 4.0))


@pytest.mark.parametrize("arch,modules", [("sd1", 192), ("sdxl", 722)])
def test_narrow_layouts_keep_the_real_models_lora_targets(arch, modules):
    """The op count is only a proxy for the full models if the narrow layouts have their modules: sd-scripts logs
    "create LoRA for U-Net: 192 modules" for SD1.x and 722 for SDXL."""
    from bench.op_count import build_narrow_model
    from networks.lora import create_network

    model = build_narrow_model(arch)
    args = make_bench_args(rank=4, extra=["--network_train_unet_only"])
    assert len(create_network(model, args).unet_loras) == modules


def test_a_graphed_plain_step_leaves_few_eager_ops():
    """With the fine-tuned forward and backward replayed (--unet_cuda_graph), what still launches one kernel per op
    is the step's eager part: noise, loss, clipping, fused AdamW. On the narrow SD1.5 layout (192 LoRA modules) it
    must stay a few dozen ops, not grow with the modules (a per-parameter loop would add hundreds)."""
    from bench.op_count import step_ops

    r = step_ops("sd1", apt=False, fast=True)
    assert r["prior_ops"] == 0 and 0.9 * r["ops"] < r["unet_ops"] < r["ops"]
    assert r["ops"] - r["unet_ops"] < 100, r["ops"] - r["unet_ops"]


def test_graphed_text_encoders_leave_few_eager_ops():
    """With the text encoders' LoRA training, their pass with grad is the other big block of launches (SD1.5: ~1300
    ops); with it and the UNet's pass replayed (--text_encoder_cuda_graph, --unet_cuda_graph) the eager remainder
    is again a few dozen ops, and each pass is counted once (the UNet's backward hands the context's gradient to
    the text encoders' instead of running through them)."""
    from bench.op_count import step_ops

    r = step_ops("sd1", apt=False, fast=True, train_te=True)
    assert r["te_lora_modules"] == 72 and r["text_ops"] > 1000
    left = r["ops"] - r["unet_ops"] - r["text_ops"]
    assert 0 < left < 100, left


def test_gpu_check_dry_run_runs_the_graph_check_first(tmp_path):
    """bench/gpu_check.sh is what a short GPU session runs: its dry run (tiny CPU configs) must get through the
    graph equality check of all three variants and the eager noise-floor row (the step benchmarks are skipped
    here; test_apt_overhead_* covers them)."""
    import subprocess

    env = dict(os.environ, OUT=str(tmp_path), SKIP_STEP_TIME="1", SKIP_APT="1", SKIP_SYNC_CHECK="1", RUN_OVERLAP="1")
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], capture_output=True, text=True, env=env,
                       timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = (tmp_path / "prior_graph_check-dryrun.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| tiny-")]
    assert len(rows) == 8 and all(ln.rstrip().endswith("✓ |") for ln in rows), table
    assert {"none (eager again: the noise floor)", "prior pass", "UNet fwd+bwd",
            "prior pass + UNet fwd+bwd"} == {ln.split("|")[2].strip() for ln in rows}
    assert "| tiny-sd1 |" in (tmp_path / "stream_overlap-dryrun.md").read_text()  # RUN_OVERLAP=1
    for mode in ("latents", "images", "full_bf16"):  # the trainer itself, as the GPU runs it (3a)
        assert f"trainer smoke ({mode}): exit code 0" in r.stdout, r.stdout[-3000:]


def test_sync_check_counts_the_debug_mode_warnings_per_place(monkeypatch, capsys):
    """bench/sync_check.py on a GPU counts CUDA's sync debug-mode warnings by file:line, and the waits on a CUDA
    event (which the mode does not see) after which the device had nothing queued; here the warnings and events
    are made by hand (a CPU has no device to wait for), and its CPU run goes through the trainer's step. The mode's
    one-time notice that it is a prototype (it says "synchronizing" too) was counted as a sync."""
    import warnings

    from bench import sync_check

    modes = []

    def set_mode(mode):
        if mode == "warn" and not modes:  # torch's TORCH_WARN_ONCE at the first use
            warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                          "synchronizing operations")
        modes.append(mode)

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    queue = []  # what the "device" still has to do after an awaited event: [] idle, ["next step"] busy

    class Event:  # stands in for torch.cuda.Event: query() of one recorded last says whether the queue was empty
        def record(self):
            self.done_at_once = not queue

        def query(self):
            return self.done_at_once

        def synchronize(self):
            pass

    monkeypatch.setattr(torch.cuda, "Event", Event)
    calls = []

    def step():
        calls.append(1)
        warnings.warn("called a synchronizing CUDA operation")  # the message torch's debug mode uses
        if len(calls) % 2:
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")
        read = Event()
        read.record()
        queue[:] = ["next step"] if len(calls) % 2 else []  # deferred: the next step queued before the wait
        read.synchronize()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warm-up call's warnings are not counted (nor shown)
        where = sync_check.count_syncs(step, n_warmup=1, n_steps=2, cuda=True)
    assert len(calls) == 3 and modes == ["warn", "default"]
    waits = {k: v for k, v in where.items() if k.endswith("(event wait)")}
    assert list(waits.values()) == [1]  # the second call waited with nothing queued; the first kept the device busy
    assert sorted(v for k, v in where.items() if k not in waits) == [1, 2]  # the prototype notice not among them
    assert all(k.startswith(os.path.join("tests", "test_bench.py:")) for k in where)
    assert torch.cuda.Event.synchronize is Event.synchronize  # put back
    monkeypatch.undo()
    assert sync_check.main(["--configs", "tiny-sd1", "--settings", "plain,apt-fast", "--steps", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "| tiny-sd1 | plain | n/a | 0 | no CUDA: nothing to count |" in out
    assert "| tiny-sd1 | apt-fast | n/a | 0 | needs CUDA |" in out
    assert [sync_check.expected_syncs(s) for s in ("plain", "apt", "apt-fast", "apt-read-each-step")] == [0, 0, 0, 1]


def test_compile_time_rows_and_a_failed_worker():
    """bench/compile_time.py: a row per run, side by side with the eager step; a worker that fails (here an unknown
    layout) becomes an error row with its last message instead of stopping the table."""
    from bench.compile_time import run_row, table

    bad = run_row("nope", "aot_eager", apt=False, real=False, steps=1, max_warmup=1, timeout=300)
    assert "unknown" in bad["error"].lower() or "nope" in bad["error"], bad
    ok = {"arch": "sd1", "backend": "aot_eager", "apt": True, "real": False, "graphs": 61, "graph_breaks": 15,
          "compile_s": 63.46, "warmup_steps": 4, "warmup_s": 65.9, "settled": False, "eager_s": 0.336,
          "compiled_s": 0.378}
    lines = table([ok, bad]).splitlines()
    assert lines[2] == ("| sd1 (narrow) | APT | aot_eager | 61 | 15 | 65.9 s (4, still compiling) | 63.5 s | 336 ms "
                        "| 378 ms | 1.12 |")
    assert lines[3].startswith("| nope (narrow) | plain | aot_eager | error: ")


def test_inductor_grad_check_measures_a_wrong_input_gradient():
    """bench/inductor_grad_check.py (why inductor is refused on the CPU) compares the right gradients: zero for a
    backend that computes the same thing, 10% for one whose graphs return outputs 10% too large."""
    from bench.inductor_grad_check import input_gradient_error, minimal_case_error

    def ten_percent_off(gm, example_inputs):
        def run(*args):
            out = gm(*args)
            return type(out)(o * 1.1 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)
        return run

    assert minimal_case_error("eager") < 1e-6
    assert minimal_case_error(ten_percent_off) == pytest.approx(0.1, rel=1e-3)  # d(1.1·Σ h²)/dx = 1.1·g
    assert input_gradient_error("eager") < 1e-6
    assert input_gradient_error("eager", contiguous=True, lora=False) < 1e-6


def test_stream_overlap_times_the_real_prior_pass(capsys):
    """bench/stream_overlap.py: its extra prior pass is the APT step's own (the prediction of `APT.prior_pass` on
    the same inputs, with the capture), `measure` alternates the three kinds, and the CPU table row says there is
    nothing to hide without CUDA."""
    from bench import stream_overlap

    model = build_bench_model("sd1", real=False, device="cpu", dtype=torch.float32)
    args = make_bench_args(rank=4, extra=["--network_train_unet_only", "--cache_text_encoder_outputs", "--apt"])
    bench = build_step_fn(model, args, device="cpu", batch=make_batch(model, batch_size=1, resolution=64))
    bench.step_fn()
    prior, inputs = stream_overlap.extra_prior(bench)
    pred, *captured = prior()
    with torch.no_grad(), bench.network.multiplier_override(0.0):
        want, rec = bench.ctx.apt.prior_pass(bench.ctx, *inputs)
    assert torch.equal(pred, want) and rec is not None and len(captured) == len(rec.flat())
    calls = []
    t = stream_overlap.measure(lambda: calls.append("s"), lambda: calls.append("p"), cuda=False, n_steps=2, rounds=2)
    assert "".join(calls) == "ss" "pp" "psps" * 2 and set(t) == {"step", "prior", "concurrent"}  # per round: 2 of each
    assert stream_overlap.main(["--configs", "tiny-sd1", "--steps", "1", "--rounds", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| tiny-sd1 \| [\d.]+ ms \| [\d.]+ ms \| [\d.]+ ms \| n/a \(no CUDA\) \| n/a \|", out), out


def test_load_memory_measures_both_loads(tmp_path):
    """bench/load_memory.py's row (a real-size file on a GPU host or by hand; a tiny one here): the fp32 load and
    the load in the training dtype both report their private and RSS peaks."""
    from bench.load_memory import measure
    from library.model_util import save_single_file
    from library.tiny_models import build_tiny_model

    path = save_single_file(build_tiny_model("sd1"), tmp_path / "tiny.safetensors")
    for how in ("fp32", "train"):
        row = measure(str(path), how, "bf16")
        assert row["private"] > 0 and row["rss"] >= row["private"] and row["seconds"] > 0
