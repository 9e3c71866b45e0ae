"""Kernel launches per training step, counted on the CPU: the ATen ops one step dispatches (views excluded).

A GPU LoRA step at batch 1 is bound by kernel launches and Python, not by math (issue 6): each non-view ATen op
is at least one launch on CUDA. The count depends on the architecture's layout (blocks, layers, LoRA modules), not
on its widths, so it is measured on the *narrow* real layouts: SD1.5's and SDXL's configs with every width
shrunk and every depth kept (SDXL's 10-layer transformers, CLIP's 12 and 32 layers), which run in seconds here.
The step is the trainer's (`bench.common.build_step_fn`: forward, backward, clipping, AdamW, schedule), under
bf16 autocast like a GPU run. CPU autocast and CPU kernels are not CUDA's, so read the counts as a proxy for
launches and the ratios between columns as the point.

    python -m bench.op_count                       # SD1.5 and SDXL layouts: plain/APT x separate/fused
    python -m bench.op_count --archs sdxl --out bench/results/op_count-cpu.md
"""
from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RESOLUTION = {"sd1": 512, "sdxl": 1024}  # the configs of the targets; latents are shrunk below
LATENT = 16  # latent side of the counted step (the count does not depend on it)


# metadata only; and `.item()` reads, which the CPU's AdamW does per parameter on its CPU step counters, as
# torch's CUDA foreach AdamW does too (the counters stay on the CPU there): no kernel on CUDA
_NO_KERNEL = (torch.ops.aten.detach, torch.ops.aten.alias, torch.ops.aten._unsafe_view,
              torch.ops.aten._local_scalar_dense)


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the `with` block; views, aliases and scalar reads (no CUDA kernel) are
    left out."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in _NO_KERNEL:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(fn) -> tuple[object, Counter]:
    """(fn(), the ops it dispatched)."""
    with OpCounter() as c:
        out = fn()
    return out, c.ops


@contextmanager
def counting_prior_pass(counts: list):
    """Within the block, each `APT.prior_pass` call appends its op count to `counts`: the ops that
    `--apt_cuda_graph` replays as one CUDA graph."""
    from apt_ext.step import APT

    orig = APT.prior_pass

    def counted(self, *args, **kwargs):
        with OpCounter() as c:
            out = orig(self, *args, **kwargs)
        counts.append(c.total)
        return out

    APT.prior_pass = counted
    try:
        yield counts
    finally:
        APT.prior_pass = orig


def counted_node(run, inputs: list, params: list, counts: list) -> tuple:
    """`run(*inputs)` as one autograd node, as a graphed callable is: the op counts of its forward and of its
    backward are appended to `counts`; the backward returns the gradients of the inputs that require grad and of
    `params` (so the ops of whatever produced the inputs are not counted again here)."""
    inner = {}

    class Node(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *tensors):
            inner["inputs"] = [t.detach().requires_grad_(t.requires_grad) for t in tensors[:len(inputs)]]
            with torch.enable_grad(), OpCounter() as c:
                inner["outs"] = list(run(*inner["inputs"]))
            counts.append(c.total)
            return tuple(o.detach() for o in inner["outs"])

        @staticmethod
        def backward(ctx, *grads):
            wrt = [t for t in inner["inputs"] if t.requires_grad] + params
            with OpCounter() as c:
                got = iter(torch.autograd.grad(inner["outs"], wrt, grads, allow_unused=True))
            counts.append(c.total)
            return tuple(next(got) if t.requires_grad else None for t in inner["inputs"]) + tuple(got)

    return Node.apply(*inputs, *params)


@contextmanager
def counting_unet_pass(counts: list):
    """Within the block the fine-tuned UNet pass (`TrainContext.unet_pass`) runs as one node (`counted_node`), as
    `--unet_cuda_graph` makes it: the ops its two graph launches replace."""
    import train_apt_lora
    from library.conditioning import TextConditioning

    orig = train_apt_lora.TrainContext.unet_pass

    def counted(self, noisy, timesteps, cond, time_ids):
        params = [p for p in self.network.parameters() if p.requires_grad]
        texts = [t for t in (cond.context, cond.pooled) if t is not None]  # a trained text encoder's outputs

        def run(*t):
            pred, rest = orig(self, noisy, timesteps, TextConditioning(t[0], t[1] if len(t) > 1 else None), time_ids)
            return [pred, *rest]

        outs = counted_node(run, texts, params, counts)
        return outs[0], list(outs[1:])

    train_apt_lora.TrainContext.unet_pass = counted
    try:
        yield counts
    finally:
        train_apt_lora.TrainContext.unet_pass = orig


@contextmanager
def counting_text_pass(counts: list):
    """Within the block the text encoders' pass with grad (`TrainContext.text_fn`'s function, as
    `--text_encoder_cuda_graph` records it) runs as one node (`counted_node`); calls without grad (APT's class
    prompts) run as they are."""
    import train_apt_lora

    orig = train_apt_lora.TrainContext.text_fn

    def counted_fn(self):
        fn = orig(self)
        params = [p for lora in self.network.text_encoder_loras for p in lora.parameters() if p.requires_grad]
        return lambda *ids: list(counted_node(fn, list(ids), params, counts)) if torch.is_grad_enabled() else fn(*ids)

    train_apt_lora.TrainContext.text_fn = counted_fn
    try:
        yield counts
    finally:
        train_apt_lora.TrainContext.text_fn = orig


def narrow_config(arch: str) -> dict:
    """The real architecture config (library/configs) with widths shrunk ~8-40x and every depth and head count
    kept: the same modules, LoRA targets and ops as the full model."""
    from library.model_util import arch_config

    cfg = copy.deepcopy(arch_config(arch))
    u = cfg["unet"]
    heads = u["attention_head_dim"]  # diffusers' name for the number of heads in SD1/SDXL configs
    per_head = 8
    if isinstance(heads, int):
        u["block_out_channels"] = [heads * per_head * m for m in (1, 2, 4, 4)][: len(u["block_out_channels"])]
    else:
        u["block_out_channels"] = [h * per_head for h in heads]
    u.update(norm_num_groups=8, sample_size=LATENT)
    te = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32)
    cfg["text_encoder"].update(te)
    ctx_dim = 32
    if "text_encoder_2" in cfg and cfg["text_encoder_2"]:
        cfg["text_encoder_2"].update(te, hidden_size=64, intermediate_size=128, projection_dim=64)
        ctx_dim += 64
        u.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8)
    u["cross_attention_dim"] = ctx_dim
    cfg["vae"].update(block_out_channels=[16, 32, 32, 32], norm_num_groups=8, layers_per_block=1)
    return cfg


def build_narrow_model(arch: str):
    from library.clip_tokenizer import bundled_clip_tokenizer
    from library.model_util import PAD_TOKENS, build_from_config

    torch.manual_seed(0)
    tokenizers = [bundled_clip_tokenizer(pad_token=pad) for pad in PAD_TOKENS[arch]]
    model = build_from_config(narrow_config(arch), tokenizers, v_parameterization=False)
    for m in [model.unet, model.vae, *model.text_encoders]:
        m.eval().requires_grad_(False)
    return model


def step_ops(arch: str, apt: bool, fast: bool, batch_size: int = 1, train_te: bool = False) -> dict:
    """Ops of one trainer step (after one warm-up step) on the narrow `arch` layout, bf16 base weights and autocast
    as the trainer sets them for --mixed_precision bf16. `fast`: this project's CUDA defaults (LoRA branch fused into
    one addmm, fused AdamW); else the LoRA branch as separate ops and foreach AdamW (torch's CUDA default).
    `train_te`: the text encoders' LoRA trains too (their outputs are not cached). Returns the total, the ops of
    the prior pass, of the fine-tuned UNet pass and of the text encoders' pass with grad (forward + backward), and
    the top ops."""
    from bench.common import build_step_fn, make_batch, make_bench_args

    model = build_narrow_model(arch)
    for m in (model.unet, *model.text_encoders):
        m.to(torch.bfloat16)
    extra = ([] if train_te else ["--cache_text_encoder_outputs", "--network_train_unet_only"]) \
        + ["--optimizer_args", "fused=True" if fast else "foreach=True"] + (["--apt"] if apt else []) \
        + ([] if fast else ["--no_fused_lora"])
    args = make_bench_args(rank=32, mixed_precision="bf16", extra=extra)
    bench = build_step_fn(model, args, device="cpu", batch=make_batch(model, batch_size, resolution=LATENT * 8))
    assert all(lora.fused == fast for lora in bench.network.loras)
    bench.step_fn()  # warm-up: caches, lazy state
    with counting_prior_pass([]) as prior:
        loss, ops = count_ops(bench.step_fn)
    with counting_prior_pass([]), counting_unet_pass([]) as unet, counting_text_pass([]) as text:  # the passes alone
        count_ops(bench.step_fn)
    return {"arch": arch, "apt": apt, "fast": fast, "batch_size": batch_size, "train_te": train_te,
            "ops": sum(ops.values()), "prior_ops": sum(prior), "unet_ops": sum(unet), "text_ops": sum(text),
            "loss": loss, "top": ops.most_common(8), "lora_modules": len(bench.network.unet_loras),
            "te_lora_modules": len(bench.network.text_encoder_loras), "counts": ops}


def table(rows: list[dict]) -> str:
    head = ["| layout | UNet LoRA modules | plain: separate ops | plain: fused | APT: separate ops | APT: fused "
            "| fused / separate (plain, APT) | APT / plain (fused) | APT, prior pass as one graph (fused) "
            "| its APT / plain | with every graph: plain | APT |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    out = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        g = {(r["apt"], r["fast"]): r for r in rows if r["arch"] == arch}
        n = lambda a, f: g[(a, f)]["ops"]  # noqa: E731
        graphed = n(True, True) - g[(True, True)]["prior_ops"] + 1  # the prior pass's ops: one graph replay
        all_plain = n(False, True) - g[(False, True)]["unet_ops"] + 2  # fine-tuned forward, backward: one each
        all_apt = graphed - g[(True, True)]["unet_ops"] + 2
        out.append(f"| {arch} (narrow, batch {g[(False, False)]['batch_size']}) | {g[(False, False)]['lora_modules']} "
                   f"| {n(False, False)} | {n(False, True)} | {n(True, False)} | {n(True, True)} "
                   f"| {n(False, True) / n(False, False):.2f}, {n(True, True) / n(True, False):.2f} "
                   f"| {n(True, True) / n(False, True):.2f} | {graphed} | {graphed / n(False, True):.2f} "
                   f"| {all_plain} | {all_apt} |")
    return "\n".join(head + out)


def te_table(rows: list[dict]) -> str:
    """The steps with text-encoder LoRA (fused paths): what the text encoders' pass with grad costs, and what is
    left with all three graphs."""
    head = ["| layout | text-encoder LoRA modules | plain | its text-encoder pass (fwd + bwd) | APT | its text-encoder "
            "pass (c*, fwd + bwd) | with every graph: plain | APT |", "|---|---|---|---|---|---|---|---|"]
    out = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        g = {r["apt"]: r for r in rows if r["arch"] == arch}
        left = {a: g[a]["ops"] - g[a]["prior_ops"] - g[a]["unet_ops"] - g[a]["text_ops"] + 4 + (1 if g[a]["prior_ops"] else 0)
                for a in g}  # each recording: a forward and a backward launch; the prior pass: one
        out.append(f"| {arch} (narrow, batch {g[False]['batch_size']}) | {g[False]['te_lora_modules']} | {g[False]['ops']} "
                   f"| {g[False]['text_ops']} | {g[True]['ops']} | {g[True]['text_ops']} | {left[False]} | {left[True]} |")
    return "\n".join(head + out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.op_count", description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="sd1,sdxl")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, te_rows = [], []
    for arch in a.archs.split(","):
        for apt in (False, True):
            for fast in (False, True):
                r = step_ops(arch, apt, fast, a.batch_size)
                print(f"{arch} apt={apt} fast={fast}: {r['ops']} ops (prior pass {r['prior_ops']}); "
                      f"top {r['top'][:6]}", file=sys.stderr)
                rows.append(r)
            r = step_ops(arch, apt, True, a.batch_size, train_te=True)
            print(f"{arch} apt={apt} text-encoder LoRA: {r['ops']} ops (text encoders {r['text_ops']})", file=sys.stderr)
            te_rows.append(r)
    text = ("ATen ops (non-view) per trainer step (forward, backward, clipping, AdamW), counted on the CPU: UNet LoRA "
            "rank 32, bf16 base weights and autocast, cached text-encoder outputs. *separate ops*: the LoRA branch as "
            "down, up, scale, add and foreach AdamW (torch's CUDA default); *fused*: this project's CUDA defaults, "
            "the branch as down + one addmm and fused AdamW. *prior pass as one graph*: the APT step's count with the "
            "ops of its no-grad prior pass replaced by the one launch of a CUDA graph replay (`--apt_cuda_graph`). "
            "*with every graph*: also the fine-tuned UNet forward and backward as two replays (`--unet_cuda_graph`): "
            "what is left is the step's eager part (noise, losses, clipping, AdamW).\n\n"
            + table(rows) + "\n\n"
            "With the text encoders' LoRA training too (rank 32, fused paths; their outputs are not cached, so every step "
            "encodes the captions with grad; APT also encodes its class prompt c without grad, which stays eager): the "
            "text encoders' pass with grad, forward and backward, is what `--text_encoder_cuda_graph` replays as two "
            "launches. *with every graph*: the three flags together.\n\n" + te_table(te_rows) + "\n")
    print(text)
    from bench.common import write_result

    write_result(text, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
