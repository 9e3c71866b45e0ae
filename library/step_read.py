"""What the end of an accumulation window reads back from the device, and when (`--defer_step_read`).

`WindowRead` holds one copy of the window's NaN/inf flags, loss and logs (`library.transfer.HostCopy`): read at once
by `train_apt_lora.micro_batch` to decide the step, or a step later by the loop once the device has dropped a bad
update itself. `LookAhead` is the loop's iterator that can hand out the next batch early (`--apt_prior_ahead`).
"""
from __future__ import annotations

import torch

from library.distributed import any_rank
from library.transfer import HostCopy


class WindowRead:
    """The end of an accumulation window, read back in one copy (`library.transfer.HostCopy`): the NaN/inf flags
    that decide the step, the loss and the logs asked for. Read at once (`--defer_step_read off`), or one window
    later, when the device has long passed it. `ok_everywhere`: `ok` and-ed over the processes on the device."""

    def __init__(self, finite, ok, loss, logs: dict, image_keys, ok_everywhere=None):
        flags = [finite, ok, ok if ok_everywhere is None else ok_everywhere]
        self._copy = HostCopy(torch.stack([*(f.float() for f in flags), loss.detach().float().reshape(()),
                                           *(v.detach().float().reshape(()) for v in logs.values())]))
        self._names, self.image_keys, self._skipped, self._flat = list(logs), list(image_keys), None, None
        self._late_names, self._late_copy, self._late = [], None, None  # logs from after the step (`extend`)

    def extend(self, logs: dict) -> None:
        """Add logs computed after the optimizer step (--scale_weight_norms' counts), copied the same way; read with
        `values` (read at once, that read waits for the step)."""
        self._late_names = list(logs)
        self._late_copy = HostCopy(torch.stack([v.detach().float().reshape(()) for v in logs.values()]))

    def _read(self) -> list:
        if self._flat is None:
            self._flat = self._copy.tolist()  # the window's one read
        return self._flat

    def decide(self, accelerator) -> bool:
        """Read now: True on every process if any process's window is not finite (its update is then dropped)."""
        self._skipped = any_rank(not self._read()[1], accelerator)
        return self._skipped

    @property
    def skipped(self) -> bool:
        """Whether the window's update was dropped (on every process)."""
        return (not self._read()[2]) if self._skipped is None else self._skipped

    @property
    def values(self) -> dict:
        """Host floats: "loss" (the window's last micro-batch's) and the logs asked for."""
        flat = self._read()
        if self._late is None and self._late_copy is not None:
            self._late = dict(zip(self._late_names, self._late_copy.tolist()))
        return {"loss": flat[3], **dict(zip(self._names, flat[4:])), **(self._late or {})}

    def warning(self) -> str:
        finite, ok = self._read()[:2]
        what = "loss" if not finite else "gradients" if not ok else "loss or gradients on another process"
        return f"non-finite {what} (images: {', '.join(self.image_keys)}): the step's update was dropped"


class LookAhead:
    """Iterates `iterable`; `peek()` fetches the next item early (once), or None at the end: the loop's look-ahead
    for --apt_prior_ahead. It fetches only when asked, inside the step: accelerate's loader flags the end of its
    epoch as it hands out the last batch, and that flag closes the accumulation window of the next micro-batch to
    start, so it must not come a batch early."""

    _EMPTY, _END = object(), object()

    def __init__(self, iterable):
        self._it, self._next = iter(iterable), self._EMPTY

    def __iter__(self):
        return self

    def __next__(self):
        item, self._next = self._next, self._EMPTY
        if item is self._EMPTY:
            return next(self._it)
        if item is self._END:
            raise StopIteration
        return item

    def peek(self):
        if self._next is self._EMPTY:
            self._next = next(self._it, self._END)
        return None if self._next is self._END else self._next
