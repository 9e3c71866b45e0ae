"""Gradient averaging across processes, done by hand.

The LoRA branches live in the network module but run inside the patched UNet / text encoders, so
wrapping the network in DistributedDataParallel would never see a forward. Instead, after the last
micro-batch of an accumulation window, every trainable gradient is averaged with one all-reduce over a
flat buffer. With one process this is a no-op.
"""
from __future__ import annotations

import torch


def all_reduce_gradients(params, accelerator) -> None:
    """Average `.grad` of `params` over all processes (in place)."""
    if accelerator.num_processes <= 1:
        return
    for p in params:  # every rank must contribute the same buffer layout (module_dropout may skip a module)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def any_rank(flag: bool, accelerator) -> bool:
    """True on every process if `flag` is True on any (so that all ranks skip, stop or save together)."""
    if accelerator.num_processes <= 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def every_rank(ok: torch.Tensor, accelerator) -> torch.Tensor:
    """`ok` (a 0-d bool tensor) and-ed over all processes, on the device: `any_rank` without the host read."""
    if accelerator.num_processes <= 1:
        return ok
    t = ok.float().reshape(1)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t[0] > 0


def gather_objects(obj, accelerator) -> list:
    """`obj` of every process, in rank order, on every process (pickled: small host objects only, such as the
    RNG states a training state saves)."""
    if accelerator.num_processes <= 1:
        return [obj]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_parameters(params, accelerator) -> None:
    """Every process's `params` set to the main process's (one broadcast of a flat buffer). Each rank initialises
    its LoRA from the shared seed, but anything that draws on one rank only before that (the main process encoding
    disk caches) would part them, and the weights are never averaged, only the gradients."""
    if accelerator.num_processes <= 1:
        return
    params = list(params)
    if not params:
        return
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    torch.distributed.broadcast(flat, src=0)
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n
