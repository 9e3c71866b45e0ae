"""Do the CUDA-graph paths train exactly like the eager ones? Side by side.

    python -m bench.prior_graph_check                       # CPU: tiny SD1 + SDXL, the "eager" replay backend
    python -m bench.prior_graph_check --configs sd15,sdxl   # CUDA: real architectures, bf16, CUDA graphs

Variants (`--variants`): `prior` — the prior pass on static buffers (`--apt_cuda_graph`,
`apt_ext.prior_graph.StaticPass`); `unet` — the fine-tuned UNet forward and backward from graphs
(`--unet_cuda_graph`, `library.unet_graph.GraphedPass`); `both`; `te` — the text encoders' forward and backward
(`--text_encoder_cuda_graph`); `all` — the three; `ahead` — `both` with the prior pass a step ahead on a second
stream (`--apt_prior_ahead`, apt_ext/prior_ahead.py); `compiled` — no graphs, the UNet's blocks compiled as
--torch_compile does (`--compile_backend`, tolerance 2e-4 in fp32: other kernels); `eager` — a second eager run, whose differences are
the comparison's noise floor (bf16 kernels with atomic reductions differ run to run). For each config and variant,
two runs from the same LoRA start (nonzero, so the fine-tuned pass differs from the prior) make `--steps` APT
optimizer steps over two bucket shapes (batch 2 at the config's resolution, batch 1 at a wider one), with the same t,
noise and augmentation draws: one eager, one through the graphs. Prints the largest relative difference over the
steps of the loss, of each logged APT term, of the LoRA gradients (‖Δg‖/‖g‖, before each optimizer step), of the
trained LoRA weights and of γ, against a tolerance (1e-6 in fp32, 2e-2 in bf16/fp16). AdamW's lr is 1e-2 in fp32
and 1e-4 in bf16/fp16: AdamW normalises each gradient element, so a last-bit difference in a near-zero gradient
becomes a whole step of lr, and at 1e-2 two bf16 runs of the same eager step end up with LoRA weights 70-90 % apart
(the first H200 run of this check, bench/results/prior_graph_check-h200.md).
Exit code 1 if one is over. tests/test_prior_graph.py and tests/test_unet_graph.py run the same comparison on
the CPU.
"""
from __future__ import annotations

import argparse
import gc
import sys

import torch

TOLERANCE = {"no": 1e-6, "bf16": 2e-2, "fp16": 2e-2}
# torch.compile runs other kernels than eager (fused, reordered sums): fp32 rounding, which AdamW (lr 1e-2 in fp32)
# scales up in the LoRA weights of near-zero gradients
COMPILE_TOLERANCE = {"no": 2e-4, "bf16": 2e-2, "fp16": 2e-2}


def _batch(model, bsz: int, h: int, w: int, seed: int) -> dict:
    from bench.common import make_batch

    batch = make_batch(model, batch_size=bsz, resolution=8 * h, seed=seed)
    batch["latents"] = torch.randn(bsz, 4, h, w, generator=torch.Generator().manual_seed(seed))
    size = torch.tensor([[8 * h, 8 * w]] * bsz)
    batch["original_sizes_hw"], batch["target_sizes_hw"] = size.clone(), size.clone()
    return batch


def run_steps(model, *, static: str | None, components: str = "ata,rs,aa", steps: int = 4, latent: int = 8,
              device: str = "cpu", mixed_precision: str = "no", rank: int = 4, unet_graph: str | None = None,
              te_graph: str | None = None, lr: float = 1e-2, ahead: bool = False):
    """`steps` APT optimizer steps on `model` (its LoRA starts from a fixed nonzero draw), cycling a batch of 2 at
    latent² and a batch of 1 at latent × 1.5·latent. `static`: None (eager prior pass) or a StaticPass backend;
    `unet_graph`: None (eager fine-tuned pass) or a GraphedPass backend; `te_graph` the same for the text encoders
    (their LoRA trains here). `ahead`: --apt_prior_ahead (each step's inputs and prior pass prepared during the step
    before, seeded there as the eager run seeds them). `lr`: AdamW's; keep it small in bf16, where
    AdamW turns a last-bit gradient difference into a whole step (a near-zero gradient's sign decides the update).
    Returns ([(loss, logs, gradient)] per step, the gradient being every LoRA gradient flattened (fp32, CPU) before
    the optimizer step, LoRA state dict, γ, number of recorded shapes (prior, else UNet))."""
    import train_apt_lora
    from apt_ext.step import APT
    from bench.common import make_accelerator, make_bench_args
    from networks.lora import LoRANetwork

    args = make_bench_args(rank=rank, alpha=rank, mixed_precision=mixed_precision,
                           extra=["--apt", "--apt_components", components, "--apt_gamma_temperature", "1000",
                                  *(["--apt_prior_ahead"] if ahead else [])])
    from library.train_util import weight_dtype as dtype_of

    weight_dtype = dtype_of(mixed_precision)
    network = LoRANetwork(model, lora_dim=rank, alpha=float(rank))
    network.apply_to()
    with torch.no_grad():
        for i, lora in enumerate(network.loras):
            lora.lora_up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    network.to(device)
    accelerator = make_accelerator(device, mixed_precision)
    apt = APT(args, model, accelerator.device)
    if static:
        apt.enable_static_prior(model, mixed_precision, torch.device(device).type, backend=static)
    ctx = train_apt_lora.TrainContext(args, accelerator, model, network, weight_dtype, torch.float32, None, apt)
    if unet_graph:
        ctx.enable_unet_graph([p for p in network.parameters() if p.requires_grad], unet_graph)
    if te_graph:
        ctx.enable_te_graph(te_graph)
    params = [p for p in network.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    shapes = [(2, latent, latent), (1, latent, latent + latent // 2)]
    batches = [_batch(model, *shapes[step % 2], seed=step) for step in range(steps)]

    def next_batch(step):  # --apt_prior_ahead: the next step's draws are made now, from the seed it would get
        def upcoming():
            if step + 1 >= steps:
                return None
            torch.manual_seed(100 + step + 1)
            return batches[step + 1]
        return upcoming

    out = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # t, noise and augmentation draws: the same in both runs
        ctx.next_batch = next_batch(step) if ahead else None
        loss, logs = train_apt_lora.training_step(args, ctx, batches[step])
        loss.backward()
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten().cpu()
                          for p in params])
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((loss.item(), {k: float(v) for k, v in logs.items()}, grad))
    weights = {k: v.detach().float().cpu() for k, v in network.state_dict().items()}
    network.restore()
    recorded = (len(apt.static_prior) if static else len(ctx.unet_graph) if unet_graph
                else len(ctx.te_graph) if te_graph else 0)
    return out, weights, apt.indicator.gamma().detach().cpu(), recorded


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def compare(eager, static) -> dict:
    """Largest relative differences between two `run_steps` results over the steps: loss, each log key, the LoRA
    gradients (‖Δg‖ / ‖g‖ per step), the trained LoRA weights (max |Δw| / max |w| per tensor), γ (absolute)."""
    (steps0, w0, g0, _), (steps1, w1, g1, _) = eager, static
    diff = {"loss": max(_rel(a[0], b[0]) for a, b in zip(steps0, steps1))}
    for k in steps0[0][1]:
        diff[k] = max(_rel(a[1][k], b[1][k]) for a, b in zip(steps0, steps1))
    diff["gradients"] = max(float((b[2] - a[2]).norm() / a[2].norm().clamp_min(1e-30)) for a, b in zip(steps0, steps1))
    diff["lora weights"] = max(float(((w1[k] - w0[k]).abs().max() / w0[k].abs().max().clamp_min(1e-12))) for k in w0)
    diff["gamma"] = float((g1 - g0).abs().max())
    return diff


def main(argv=None) -> int:
    from bench.common import CONFIGS, build_bench_model
    from library.train_util import weight_dtype

    p = argparse.ArgumentParser(prog="python -m bench.prior_graph_check", description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=None, help="from bench/common.py CONFIGS (default: tiny-sd1,tiny-sdxl, "
                   "plus sd15,sdxl with CUDA)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--variants", default="prior,unet,both",
                   help="prior, unet, both, te (text encoders), all, ahead (both + --apt_prior_ahead), compiled (--torch_compile's UNet blocks instead of "
                        "graphs), eager (a second eager run: the noise floor of the comparison), comma-separated")
    p.add_argument("--compile_backend", default=None,
                   help="torch.compile backend of the compiled variant (default: inductor with CUDA, else aot_eager)")
    a = p.parse_args(argv)
    compile_backend = a.compile_backend or ("inductor" if torch.cuda.is_available() else "aot_eager")
    variants = {"eager": (), "prior": ("prior pass",), "unet": ("UNet fwd+bwd",),
                "both": ("prior pass", "UNet fwd+bwd"), "te": ("text encoders fwd+bwd",),
                "all": ("prior pass", "UNet fwd+bwd", "text encoders fwd+bwd"),
                "ahead": ("prior pass", "UNet fwd+bwd", "prior pass a step ahead"),
                "compiled": (f"torch.compile blocks ({compile_backend})",)}
    names = a.configs.split(",") if a.configs else [n for n, c in CONFIGS.items()
                                                      if c.device == "cpu" or torch.cuda.is_available()]
    failed = False
    print("| config | graphs | backend | precision | recorded shapes | loss | largest other term | gradients "
          "| LoRA weights | γ | tolerance | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        cfg = CONFIGS[name]
        if cfg.device == "cuda" and not torch.cuda.is_available():
            print(f"| {name} | - | - | - | needs CUDA | | | | | | | ✗ |")
            failed = True
            continue
        backend = "cuda" if cfg.device == "cuda" else "eager"
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.dtype]
        lr = 1e-2 if mp == "no" else 1e-4  # see run_steps: AdamW amplifies low-precision noise in proportion to lr

        def run(graphs):
            model = build_bench_model(cfg.arch, cfg.real, cfg.device, weight_dtype(mp))
            if any(g.startswith("torch.compile") for g in graphs):
                from library.torch_compile import compile_unet_blocks

                compile_unet_blocks(model.unet, compile_backend)  # lazily traced: LoRA and APT's processors included
            try:
                return run_steps(model, static=backend if "prior pass" in graphs else None, steps=a.steps,
                                 latent=cfg.resolution // 8, device=cfg.device, mixed_precision=mp, lr=lr,
                                 unet_graph=backend if "UNet fwd+bwd" in graphs else None,
                                 te_graph=backend if "text encoders fwd+bwd" in graphs else None,
                                 ahead="prior pass a step ahead" in graphs)
            finally:  # LoRA and APT hooks and the graphed forwards hold the model (and graph pools) in reference
                del model  # cycles: only the cycle collector frees them, before the next run builds its own
                gc.collect()
                if cfg.device == "cuda":
                    torch.cuda.empty_cache()

        try:
            eager = run(())
        except Exception as e:  # the reference failed: this config has no rows, the next one may
            print(f"| {name} | none (the eager reference) | {backend} | {cfg.dtype} | failed: {type(e).__name__}: "
                  f"{str(e)[:200]} | | | | | | | ✗ |", flush=True)
            failed = True
            continue
        for v in a.variants.split(","):
            graphs = variants[v]
            label = " + ".join(graphs) or "none (eager again: the noise floor)"
            try:
                fast = run(graphs)
            except Exception as e:  # one failing variant must not hide the others' rows
                print(f"| {name} | {label} | {backend} | {cfg.dtype} | failed: {type(e).__name__}: "
                      f"{str(e)[:200]} | | | | | | | ✗ |", flush=True)
                failed = True
                continue
            d = compare(eager, fast)
            other = max((v, k) for k, v in d.items() if k not in ("loss", "gradients", "lora weights", "gamma"))
            compiled = v == "compiled"
            tol = (COMPILE_TOLERANCE if compiled else TOLERANCE)[mp]
            # two recordings: one per bucket shape (prior, UNet), per batch size (text encoders: 2 and 1)
            ok = all(v <= tol for v in d.values()) and fast[3] == (2 if graphs and not compiled else 0)
            failed |= not ok
            print(f"| {name} | {label} | {backend} | {cfg.dtype} | {fast[3]} | {d['loss']:.1e} | "
                  f"{other[0]:.1e} ({other[1]}) | {d['gradients']:.1e} | {d['lora weights']:.1e} | {d['gamma']:.1e} "
                  f"| {tol:g} | {'✓' if ok else '✗'} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
