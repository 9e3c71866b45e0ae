"""Host-to-device copies that do not make the host wait for the device (issue 6).

On CUDA, torch copies a pageable host tensor and then synchronises the stream: the host waits for every queued
kernel, and the GPU then idles while Python prepares the next ones. A pinned tensor's copy is queued like a
kernel instead, and torch's pinned-memory cache keeps its buffer until the copy has run.
The other way, `HostCopy` queues a device-to-host copy now and reads it later (--defer_step_read).
"""
from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """`x` on `device` (then cast to `dtype` there), without a stream sync when it is a host tensor going to CUDA
    (or to the meta device, the stand-in for an accelerator in the sync audit of tests/test_no_host_sync.py)."""
    device = torch.device(device)
    if x.device.type == "cpu" and device.type in ("cuda", "meta"):
        if device.type == "cuda":
            x = x.pin_memory()
        x = x.to(device, non_blocking=True)  # then any cast runs on the device
    return x.to(device, dtype)


class HostCopy:
    """A device tensor's values, queued for the host now and read later with `tolist()`. On CUDA: a non-blocking
    copy into pinned memory and an event after it, so `tolist()` waits for that copy only, not for the kernels
    queued since (read one optimizer step later, the device is long past it). Elsewhere it keeps the tensor
    and reads it at `tolist()`."""

    def __init__(self, x: torch.Tensor):
        self._event = None
        if x.device.type == "cuda":
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            x = host
        self._host = x

    def tolist(self):
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host.tolist()
