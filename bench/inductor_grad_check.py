"""Does inductor compute the LoRA'd transformer block's gradients right? The check behind refusing
`--dynamo_backend inductor` on the CPU (library/torch_compile.py), small enough to rerun on each new torch.

Found with torch 2.13 (CPU): a diffusers BasicTransformerBlock whose Linear layers carry this project's LoRA,
given a non-contiguous `hidden_states` of shape (1, 2, 64) with strides (2, 1, 2) — what the SD1 mid block of the
tiny model receives at batch 1 (the permuted proj_in output) — returns an input gradient 10% off the eager one
under inductor; the parameter gradients are right, the same block without LoRA is right, and
"aot_eager_decomp_partition" (inductor's decompositions and partitioner, no generated code) is right. In a whole
UNet the wrong input gradient reaches every LoRA before that block.

Reduced to torch alone (`minimal_case_error`, the first rows; the case to report upstream): a LayerNorm with a
weight, applied to a transposed input `torch.randn(1, 64, 2).transpose(1, 2)`, whose output feeds four matmuls.
With three matmuls (a block's q, k, v without LoRA), without the LayerNorm weight, or with a contiguous input, the
input gradient is right; with four (q, k, v and the LoRA down-projection of to_q) or five it is off by more than
100%.

    python -m bench.inductor_grad_check                  # CPU inductor; exit 1 if the gradient is off
    python -m bench.inductor_grad_check --device cuda    # the same block on CUDA (triton)
"""
from __future__ import annotations

import argparse
import sys

import torch


def minimal_case_error(backend: str, device: str = "cpu", consumers: int = 4, contiguous: bool = False) -> float:
    """‖Δ‖/‖g‖ between eager and compiled input gradients of layer_norm(x, weight) feeding `consumers` matmuls."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    width = 64
    mats = [(torch.randn(width, width, generator=g) * 0.1).to(device) for _ in range(consumers)]
    weight = (1 + 0.1 * torch.randn(width, generator=g)).to(device)
    base = torch.randn(1, width, 2, generator=g).to(device)

    def f(x):
        h = F.layer_norm(x, (width,), weight)
        return sum((h @ m).pow(2).sum() for m in mats)

    def grad(fn):
        x = base.transpose(1, 2)
        x = (x.contiguous() if contiguous else x).detach().requires_grad_(True)
        fn(x).backward()
        return x.grad

    eager = grad(f)
    torch._dynamo.reset()
    compiled = grad(torch.compile(f, backend=backend))
    return float((compiled - eager).norm() / eager.norm())


def input_gradient_error(backend: str, device: str = "cpu", contiguous: bool = False, lora: bool = True) -> float:
    """‖Δ‖/‖g‖ between the eager and the compiled input gradient of the tiny SD1 mid block's transformer block."""
    from diffusers.models.attention import BasicTransformerBlock

    from library.tiny_models import build_tiny_model
    from networks.lora import LoRANetwork

    model = build_tiny_model("sd1")
    if lora:
        network = LoRANetwork(model, lora_dim=4, alpha=4.0)
        network.apply_to()
        with torch.no_grad():  # a LoRA that does something (up weights start at zero)
            for i, m in enumerate(network.loras):
                m.lora_up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
        network.to(device)
    model.unet.to(device)
    block = next(m for n, m in model.unet.named_modules()
                 if n.startswith("mid_block") and isinstance(m, BasicTransformerBlock))
    g = torch.Generator().manual_seed(0)
    width = block.norm1.normalized_shape[0]
    flat = torch.randn(2 * width, generator=g).to(device)
    context = torch.randn(1, 77, block.attn2.to_k.in_features, generator=g).to(device)

    def grad(fn):
        x = flat.clone().as_strided((1, 2, width), (2 * width, width, 1) if contiguous else (2, 1, 2)).detach()
        x.requires_grad_(True)
        fn(x, encoder_hidden_states=context).pow(2).mean().backward()
        return x.grad

    eager = grad(block)
    torch._dynamo.reset()
    compiled = grad(torch.compile(block, backend=backend))
    return float((compiled - eager).norm() / eager.norm())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inductor_grad_check", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tolerance", type=float, default=1e-4)
    a = p.parse_args(argv)
    bad = False
    print("| case | backend | input | input gradient vs eager (‖Δ‖/‖g‖) | ok |\n|---|---|---|---|---|")

    def row(case, backend, contiguous, err, decisive):
        nonlocal bad
        ok = err <= a.tolerance
        bad |= decisive and not ok
        layout = "contiguous" if contiguous else "transposed"
        print(f"| {case} | {backend} | {layout} | {err:.1e} | {'✓' if ok else '✗'} |", flush=True)

    for consumers in (3, 4, 5):
        row(f"torch: layer_norm → {consumers} matmuls", "inductor", False,
            minimal_case_error("inductor", a.device, consumers), consumers == 4)
    row("torch: layer_norm → 4 matmuls", "inductor", True, minimal_case_error("inductor", a.device, 4, True), False)
    for backend, lora, contiguous in [("inductor", True, False), ("inductor", True, True), ("inductor", False, False),
                                      ("aot_eager_decomp_partition", True, False)]:
        case = f"SD1 mid-block transformer block, {'with' if lora else 'without'} LoRA"
        row(case, backend, contiguous, input_gradient_error(backend, a.device, contiguous=contiguous, lora=lora),
            backend == "inductor" and lora and not contiguous)
    print(f"\ntorch {torch.__version__}, device {a.device}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
