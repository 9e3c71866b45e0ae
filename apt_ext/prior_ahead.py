"""--apt_prior_ahead: the next step's inputs and prior pass, queued before this step's backward (issue 6).

The prior pass needs x_t, t and the class prompt c of its step, and the base model, which never changes: nothing
the optimizer writes (at multiplier 0 the LoRA branch is not computed at all). Step k+1's prior pass can therefore
run during step k's backward, on a second CUDA stream, where a GPU that a batch-1 step leaves mostly idle may run
both at once (bench/stream_overlap.py measures how much of it hides). What has to come first comes first: step
k+1's γ (its augmentation probability) is read after step k's indicator update.

Exactness: `apt_ext.step.prepare_step` makes every draw of a step, and runs after step k's fine-tuned forward
either way, so the generators hand out the same numbers in the same order and a run with the flag equals one
without, bit for bit. Saving a training state between the two would store generators already advanced by step k+1:
`rewind()` puts them back and forgets the prepared step, which the next step then prepares again.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from library.rng import rng_state, set_rng_state


def _tensors(x):
    """Every tensor inside `x` (nested tuples, lists, dicts, NamedTuples, dataclasses such as CaptureRecord)."""
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        yield from _tensors(vars(x))


class PriorAhead:
    """One prepared step at a time: `start(batch, prepare)` queues it (on a side stream on CUDA), `take(batch)`
    hands it to the step for that very batch, `rewind()` undoes it."""

    def __init__(self, device):
        device = torch.device(device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._batch = self._inputs = self._rng = None

    def start(self, batch, prepare: Callable) -> None:
        self.rewind()  # at most one step ahead
        self._rng = rng_state()
        if self.stream is None:
            self._inputs = prepare()
        else:
            self.stream.wait_stream(torch.cuda.current_stream())  # the indicator update, the step's inputs
            with torch.cuda.stream(self.stream):
                self._inputs = prepare()
        self._batch = batch

    def take(self, batch) -> Optional[object]:
        """What `start` prepared for `batch` (the same object), or None (then the step prepares itself)."""
        if self._batch is None or self._batch is not batch:
            self.rewind()
            return None
        inputs = self._inputs
        self._batch = self._inputs = self._rng = None
        if self.stream is not None:
            current = torch.cuda.current_stream()
            current.wait_stream(self.stream)
            for t in _tensors(inputs):  # made on the side stream, used and freed on this one
                t.record_stream(current)
        return inputs

    def rewind(self) -> None:
        """Forget the prepared step and put the generators back as they were before it."""
        if self._batch is not None:
            if self.stream is not None:
                torch.cuda.current_stream().wait_stream(self.stream)  # its tensors may be freed now
            set_rng_state(self._rng)
        self._batch = self._inputs = self._rng = None
