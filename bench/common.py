"""Reusable pieces of the step benchmarks: build a model, a batch and the trainer's step, and time it.

The step timed is the trainer's own: `train_apt_lora.training_step(args, ctx, batch)` with a `TrainContext`,
then what `train()`'s loop does around it (backward, gradient all-reduce, clipping, AdamW step, LR schedule,
zero_grad, `loss.item()`). The APT step is timed the same way: trainer flags such as `--apt` in
`make_bench_args(extra=...)` (`python -m bench.step_time --train_args="--apt"`), or any
`step(args, ctx, batch) -> (loss, logs)` passed to `build_step_fn`.

    model = build_bench_model("sd1", real=False, device="cpu", dtype=torch.float32)
    bench = build_step_fn(model, make_bench_args(), device="cpu")
    median_s, peak_bytes = time_steps(bench.step_fn, n_warmup=2, n_steps=10, device="cpu")

Each config of `CONFIGS` is best run in a fresh process (`run_config_isolated`): the accelerate state is per process,
CPU peak memory is a per-process high-water mark, and a config that runs out of memory or time does not take the
others with it.
"""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "BENCH_RESULT "  # a worker's result line on stdout (JSON follows)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class BenchConfig:
    """One benchmark configuration. `grad_ckpt`: the gradient-checkpointing settings timed (one row each)."""

    name: str
    arch: str  # "sd1" | "sd2" | "sdxl"
    real: bool  # the real architecture (library/configs) with random weights; False: library.tiny_models
    device: str  # "cpu" | "cuda"
    dtype: str  # key of DTYPES: the frozen base weights and the autocast dtype (LoRA weights stay fp32)
    resolution: int  # image side in pixels (latents are resolution / 8)
    batch_size: int = 1
    rank: int = 32
    grad_ckpt: tuple = (False, True)
    train_text_encoder: bool = True
    train_args: tuple = ()  # more train_apt_lora.py flags, e.g. ("--apt",) to time the APT step


CONFIGS = {
    "tiny-sd1": BenchConfig("tiny-sd1", "sd1", real=False, device="cpu", dtype="fp32", resolution=64),
    "tiny-sdxl": BenchConfig("tiny-sdxl", "sdxl", real=False, device="cpu", dtype="fp32", resolution=64),
    "sd15": BenchConfig("sd15", "sd1", real=True, device="cuda", dtype="bf16", resolution=512),
    "sdxl": BenchConfig("sdxl", "sdxl", real=True, device="cuda", dtype="bf16", resolution=1024),
}


# ------------------------------------------------------------------------------------------------ model and batch
def build_bench_model(arch: str, real: bool, device="cpu", dtype=torch.float32):
    """A `StableDiffusionModel` with random weights, frozen, as `load_model` + the trainer would place it:
    UNet and text encoders on `device` in `dtype`, the VAE on the CPU in fp32 (the trainer's place for it with
    --cache_latents; the benchmark batches carry latents, so the step never runs it).

    `real`: the full-size architecture of library/configs (SD1.5 860M UNet, SDXL 2.6B UNet), built directly on
    `device` (a `torch.device` context, so no full-size CPU copy is made and every buffer, e.g. CLIP's position ids,
    is initialised as usual), in fp32 and then cast. Otherwise the tiny model of `library.tiny_models`."""
    from library.clip_tokenizer import bundled_clip_tokenizer
    from library.model_util import PAD_TOKENS, arch_config, build_from_config
    from library.tiny_models import build_tiny_model
    from train_apt_lora import quiet_libraries

    quiet_libraries()  # as the trainer: no diffusers warning on each dtype cast below
    device = torch.device(device)
    if real:
        torch.manual_seed(0)
        tokenizers = [bundled_clip_tokenizer(pad_token=pad) for pad in PAD_TOKENS[arch]]
        with torch.device(device):
            model = build_from_config(arch_config(arch), tokenizers, v_parameterization=False)
    else:
        model = build_tiny_model(arch, seed=0)
    for m in [model.unet, model.vae, *model.text_encoders]:
        m.eval().requires_grad_(False)
    model.vae.to("cpu", torch.float32)
    model.unet.to(device, dtype)
    for te in model.text_encoders:
        te.to(device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the fp32 build is gone; do not count its cached blocks
    return model


_WORDS = ("sks", "dog", "cat", "photo", "portrait", "red", "blue", "backpack", "grass", "beach", "studio", "light",
          "close-up", "of", "a", "on", "in", "the", "with", "high", "detail", "painting", "sunset", "city")


def make_batch(model, batch_size: int = 1, resolution: int = 512, seed: int = 0, n_words: int = 12) -> dict:
    """A random batch in the dataset's batch-dict layout (docs/architecture.md) with cached latents:
    `latents` (B, 4, res/8, res/8) standard normal (already x latent_scale: unit variance like real ones),
    `images` None, random `n_words`-word captions around "sks dog", SDXL size conditioning of a square crop."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    h = w = resolution // 8
    captions = [" ".join(["a photo of sks dog"] + [rng.choice(_WORDS) for _ in range(n_words - 5)])
                for _ in range(batch_size)]
    size = torch.tensor([[resolution, resolution]] * batch_size, dtype=torch.long)
    return {
        "images": None,
        "latents": torch.randn(batch_size, 4, h, w, generator=g),
        "captions": captions,
        "class_tokens": ["sks dog"] * batch_size,
        "prior_class_tokens": ["dog"] * batch_size,
        "is_reg": torch.zeros(batch_size, dtype=torch.bool),
        "loss_weights": torch.ones(batch_size, dtype=torch.float32),
        "original_sizes_hw": size.clone(),
        "crop_top_lefts": torch.zeros(batch_size, 2, dtype=torch.long),
        "target_sizes_hw": size.clone(),
        "image_keys": [f"bench_{i}" for i in range(batch_size)],
    }


def make_bench_args(rank: int = 32, alpha: float | None = None, mixed_precision: str = "no", extra=()):
    """Trainer arguments (the real parser's defaults) for a LoRA of `rank` on UNet and text encoders, AdamW,
    `--cache_latents` (the benchmark batches carry latents; APT then augments in latent space). `extra`: more flags."""
    from library.train_args import setup_parser

    argv = ["--pretrained_model_name_or_path", "bench", "--output_dir", "bench-out", "--network_dim", str(rank),
            "--network_alpha", str(alpha if alpha is not None else rank / 2), "--mixed_precision", mixed_precision,
            "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--seed", "0", "--cache_latents", *extra]
    return setup_parser().parse_args(argv)


# ------------------------------------------------------------------------------------------------ the step
def make_accelerator(device: str, mixed_precision: str):
    """An `Accelerator` on `device`. accelerate keeps one state per process: a second call with other settings in
    the same process resets it (private API; prefer one config per process, see run_config_isolated)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=torch.device(device).type == "cpu")
    except ValueError:
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed_precision, cpu=torch.device(device).type == "cpu")


@dataclass
class BenchStep:
    """What `build_step_fn` made: `step_fn()` runs one optimizer step and returns the loss (a float; with
    --defer_step_read, the previous step's, None at the first)."""

    step_fn: object
    args: object
    ctx: object
    network: object
    optimizer: object
    accelerator: object
    batch: dict
    lora_params: int = 0
    trainable: list = field(default_factory=list)


def build_step_fn(model, args, device="cpu", batch: dict | None = None, step=None) -> BenchStep:
    """The trainer's setup and loop body around one step function (default `train_apt_lora.training_step`),
    as in `train_apt_lora.train`: `create_network` + `apply_to`, the APT state when the args ask for it
    (`--apt`, DCO), `--torch_compile`, the text-encoder output cache (`--cache_text_encoder_outputs`), `prepare_optimizer_params`, `get_optimizer`, `get_lr_scheduler`, `accelerator.prepare(optimizer)`,
    then per micro-batch the loop body (`train_apt_lora.micro_batch`): accumulate, step, backward, and at the
    window's end `all_reduce_gradients`, `clip_grad_norm_`, the one read of flags and loss, `any_rank`, optimizer
    and scheduler step (skipped for a non-finite loss or gradients), zero_grad.

    `step(args, ctx, batch) -> (loss, logs)`: the step to time (default: the trainer's, which dispatches to the
    APT step when `ctx.apt` is set). `batch`: default `make_batch(model)` at 512 px."""
    import train_apt_lora
    from library import train_util
    from library.optimizers import defer_step_read, get_lr_scheduler, get_optimizer
    from networks import lora as lora_lib

    step = step or train_apt_lora.training_step
    weight_dtype = train_util.weight_dtype(args.mixed_precision)
    accelerator = make_accelerator(device, args.mixed_precision)
    train_util.set_unet_layout(model.unet, args)
    from library.fp8_base import apply_fp8_flags

    apply_fp8_flags(model, args, weight_dtype)
    network = lora_lib.create_network(model, args)
    network.apply_to()
    network.set_multiplier(args.network_multiplier)
    network.to(accelerator.device)
    network.train()
    apt = None
    if getattr(args, "apt", False) or getattr(args, "loss_type", "l2") == "dco":
        from apt_ext.step import APT, apt_enabled

        apt = APT(args, model, accelerator.device) if apt_enabled(args) else None
    from library.torch_compile import maybe_compile

    maybe_compile(args, model.unet)
    params = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    _, optimizer = get_optimizer(args, params)
    lr_scheduler = get_lr_scheduler(args, optimizer, args.max_train_steps)
    optimizer = accelerator.prepare(optimizer)
    trainable = [p for p in network.parameters() if p.requires_grad]
    te_cache = None
    if getattr(args, "cache_text_encoder_outputs", False):  # as the trainer: frozen text encoders, outputs memoised
        from library.conditioning import TextEncoderCache

        te_cache = TextEncoderCache(model, clip_skip=args.clip_skip, max_token_length=args.max_token_length)
    ctx = train_apt_lora.TrainContext(args, accelerator, model, network, weight_dtype, torch.float32, te_cache,
                                      **({"apt": apt} if apt is not None else {}))
    backend = "cuda" if accelerator.device.type == "cuda" else "eager"  # eager: the CPU stand-in of a recording
    from library.unet_graph import GRAPH_FLAGS, blocker_message, graph_blockers

    for flag in GRAPH_FLAGS:  # what the trainer refuses is not timed (e.g. a graph with --gradient_checkpointing)
        reasons = graph_blockers(  # cuda=True: on a CPU the "eager" backend stands in for the recording
            flag, cuda=True, apt_on=apt is not None, gradient_checkpointing=args.gradient_checkpointing,
            trains_text_encoder=network.trains_text_encoder,
            has_dropout=network.has_dropout, torch_compile=args.torch_compile)
        if getattr(args, flag, False) and reasons:
            raise ValueError(blocker_message(flag, reasons[0]))
    if getattr(args, "unet_cuda_graph", False):
        ctx.enable_unet_graph(trainable, backend)
    if getattr(args, "text_encoder_cuda_graph", False):
        ctx.enable_te_graph(backend)
    batch = batch if batch is not None else make_batch(model)

    ctx.defer_read = defer_step_read(args, optimizer, accelerator.device.type)  # as the trainer (--defer_step_read)
    pending = []

    ctx.next_batch = (lambda: batch) if getattr(args, "apt_prior_ahead", False) else None  # the same batch again

    def step_fn() -> float | None:  # exactly the trainer's loop body
        res = train_apt_lora.micro_batch(args, ctx, batch, optimizer, lr_scheduler, trainable, step)
        if res.status == "queued":  # deferred: the previous step's loss (None at the first), as the trainer shows it
            pending.append(res.read)
            return pending.pop(0).values["loss"] if len(pending) > 1 else None
        return res.values["loss"] if res.values is not None else res.loss.detach().item()

    return BenchStep(step_fn, args, ctx, network, optimizer, accelerator, batch,
                     lora_params=sum(p.numel() for p in trainable), trainable=trainable)


def set_gradient_checkpointing(model, enabled: bool, train_text_encoder: bool = True) -> None:
    """What the trainer does for --gradient_checkpointing (UNet, and the text encoders when their LoRA trains);
    `enabled=False` undoes it (modules back in eval mode, as load_model leaves them)."""
    if enabled:
        model.unet.enable_gradient_checkpointing()
        model.unet.train()  # diffusers checkpoints only in training mode
        if train_text_encoder:
            for te in model.text_encoders:
                te.gradient_checkpointing_enable()
                te.train()
    else:
        model.unet.disable_gradient_checkpointing()
        model.unet.eval()
        for te in model.text_encoders:
            te.gradient_checkpointing_disable()
            te.eval()


# ------------------------------------------------------------------------------------------------ timing
def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: reset the process's RSS high-water mark (VmHWM) to the current RSS ("5" > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _current_rss_bytes() -> int:
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def memory_measure(device) -> str:
    """How `time_steps` measures peak memory on `device` (for table notes)."""
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated over warm-up + timed steps (absolute: weights included)"
    if os.path.exists("/proc/self/clear_refs"):
        return ("peak RSS growth: /proc/self/status VmHWM (high-water mark reset through /proc/self/clear_refs) "
                "minus VmRSS before the first warm-up step (weights excluded)")
    return "peak RSS growth: resource.getrusage ru_maxrss minus RSS before the first warm-up step (process-wide peak)"


def time_steps(step_fn, n_warmup: int, n_steps: int, device=None) -> tuple[float, int]:
    """Run `step_fn()` `n_warmup` times untimed, then `n_steps` times timed; return (median seconds per step,
    peak memory bytes over warm-up and timed steps). CUDA: `torch.cuda.max_memory_allocated` (weights included),
    synchronised around each step (warm-up steps too). Every step's seconds are kept in `time_steps.last_times` and
    `time_steps.last_warmup_times`. CPU: peak RSS growth over the RSS before the warm-up (see memory_measure).
    `device`: where the step runs (default: cuda if available, else cpu)."""
    if n_steps < 1:
        raise ValueError("n_steps must be >= 1")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        import gc

        gc.collect()
        _reset_peak_rss()
        base = _current_rss_bytes()
    warmup_times = []
    for _ in range(n_warmup):
        t0 = time.perf_counter()
        step_fn()
        if cuda:
            torch.cuda.synchronize(device)
        warmup_times.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        step_fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if cuda else max(0, _peak_rss_bytes() - base)
    time_steps.last_times = times  # every timed step, for whoever wants more than the median
    time_steps.last_warmup_times = warmup_times  # every warm-up step (first-step costs: capture, compile, caches)
    return statistics.median(times), int(peak)


# ------------------------------------------------------------------------------------------------ one config
def device_name(device) -> str:
    """The card (torch.cuda.get_device_name) or the CPU model (/proc/cpuinfo) and the torch thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, torch threads: {torch.get_num_threads()}"


def run_config(cfg: BenchConfig, n_warmup: int, n_steps: int, grad_ckpt=None) -> list[dict]:
    """Build `cfg`'s model and the trainer's step, and time it with each gradient-checkpointing setting.
    One result dict per setting (JSON-serialisable): the config, device, step seconds, peak bytes."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{cfg.name} needs CUDA, and torch.cuda.is_available() is False")
    dtype = DTYPES[cfg.dtype]
    t0 = time.perf_counter()
    model = build_bench_model(cfg.arch, cfg.real, cfg.device, dtype)
    extra = ([] if cfg.train_text_encoder else ["--network_train_unet_only"]) + list(cfg.train_args)
    args = make_bench_args(cfg.rank, mixed_precision=MIXED_PRECISION[cfg.dtype], extra=extra)
    batch = make_batch(model, cfg.batch_size, cfg.resolution)
    settings = list(cfg.grad_ckpt if grad_ckpt is None else grad_ckpt)
    # as in the trainer: gradient checkpointing first, then the LoRA network and APT (which hooks the modules)
    set_gradient_checkpointing(model, settings[0], cfg.train_text_encoder)
    bench = build_step_fn(model, args, cfg.device, batch)
    build_s = time.perf_counter() - t0
    rows = []
    for gc_on in settings:
        set_gradient_checkpointing(model, gc_on, cfg.train_text_encoder)
        median_s, peak = time_steps(bench.step_fn, n_warmup, n_steps, cfg.device)
        rows.append({**asdict(cfg), "grad_ckpt": gc_on, "device_name": device_name(cfg.device),
                     "n_warmup": n_warmup, "n_steps": n_steps, "median_s": median_s,
                     "times_s": list(time_steps.last_times),
                     "warmup_times_s": list(time_steps.last_warmup_times), "peak_bytes": peak,
                     "memory_measure": memory_measure(cfg.device), "lora_params": bench.lora_params,
                     "unet_params": sum(p.numel() for p in model.unet.parameters()),
                     "build_s": build_s, "torch": torch.__version__,
                     "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None})
    return rows


def run_config_isolated(name: str, n_warmup: int, n_steps: int, timeout: float | None = None,
                        overrides: dict | None = None, threads: int | None = None) -> list[dict]:
    """`run_config(CONFIGS[name])` in a fresh `python -m bench.step_time --worker` process. A failure or a timeout
    becomes one row with an "error" entry, so the table shows it and the other configs still run.
    `overrides`: BenchConfig fields to replace (e.g. {"device": "cpu", "resolution": 256} for a CPU dry run)."""
    cmd = [sys.executable, "-m", "bench.step_time", "--worker", name, "--warmup", str(n_warmup),
           "--steps", str(n_steps)]
    if overrides:
        cmd += ["--override_json", json.dumps(overrides)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    base = {"name": name, **(overrides or {})}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{**base, "error": f"timeout after {timeout:.0f} s"}]
    rows = [json.loads(line[len(RESULT_PREFIX):]) for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not rows:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        sys.stderr.write(f"[{name}] failed after {time.perf_counter() - t0:.0f} s:\n" + "\n".join(lines[-20:]) + "\n")
        return rows + [{**base, "error": last[:200]}]
    return rows


# ------------------------------------------------------------------------------------------------ table
def write_result(text: str, out: str | None) -> None:
    """A benchmark's report to its `--out` file, as every bench script writes it: atomically (a run stopped midway
    leaves the earlier results whole), its folder made, replacing the last run's."""
    if out:
        from library.safe_io import atomic_write_bytes

        atomic_write_bytes(out, text.encode(), overwrite=True)
        print(f"wrote {out}", file=sys.stderr)


def _fmt_bytes(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB"


def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table (one row per config and gradient-checkpointing setting)."""
    head = ["config", "device", "dtype", "resolution", "batch", "grad ckpt", "LoRA params", "step (median)",
            "min / max", "steps/s", "peak memory"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            gc = r.get("grad_ckpt")
            gc = gc[0] if isinstance(gc, (list, tuple)) and len(gc) == 1 else gc
            cells = [r["name"], r.get("device", ""), r.get("dtype", ""), "", "",
                     "" if gc is None else ("on" if gc else "off"), "", "", "", "", f"error: {r['error']}"]
            out.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
            continue
        dev = "GPU" if r["device"] == "cuda" else "CPU"
        mem_kind = "max allocated" if r["device"] == "cuda" else "RSS growth"
        name = r["name"] + (f" `{' '.join(r['train_args'])}`" if r.get("train_args") else "")
        out.append(
            f"| {name} | {dev} | {r['dtype']} | {r['resolution']}² | {r['batch_size']} | "
            f"{'on' if r['grad_ckpt'] else 'off'} | {r['lora_params'] / 1e6:.2f} M (rank {r['rank']}) | "
            f"{r['median_s'] * 1000:.1f} ms | {min(r['times_s']) * 1000:.0f} / {max(r['times_s']) * 1000:.0f} ms | "
            f"{1 / r['median_s']:.2f} | {_fmt_bytes(r['peak_bytes'])} ({mem_kind}) |")
    return "\n".join(out)


def env_summary(rows: list[dict]) -> list[str]:
    """Lines naming the machine: the CPU model and every GPU seen, torch and library versions."""
    import accelerate
    import diffusers
    import transformers

    names = sorted({r["device_name"] for r in rows if "device_name" in r})
    lines = [f"- device: {n}" for n in names]
    if not names:
        lines.append(f"- device: {device_name('cpu')}")
    loads = [r["loadavg_1min"] for r in rows if r.get("loadavg_1min") is not None]
    if loads:
        lines.append(f"- 1-minute load average after each config's timed steps: {min(loads):.2f} to {max(loads):.2f} "
                     f"on {os.cpu_count()} CPUs; other processes slow CPU steps down, so on a shared machine the "
                     "minimum is the least disturbed figure")
    lines.append(f"- torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
                 f"{transformers.__version__}, accelerate {accelerate.__version__}, Python {platform.python_version()}")
    return lines
