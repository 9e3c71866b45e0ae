"""Ctrl-C and SIGTERM during training: finish the step, save, and say how to resume.

The first SIGINT/SIGTERM only sets a flag; the training loop checks it after each optimizer step (with several
processes, the next step's check: they agree without waiting for the device), saves the LoRA and the full
training state, and exits. A second signal raises KeyboardInterrupt at once:
every file is written to a temporary name and renamed, so stopping in the middle of a save leaves the
previous complete files, never a truncated one.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import threading

logger = logging.getLogger(__name__)

# SIGBREAK: Ctrl-Break in a Windows console (SIGTERM is never delivered there: taskkill and closing the window kill
# at once, so Ctrl-C and Ctrl-Break are the ways to stop with a save on Windows)
SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ())


class GracefulInterrupt:
    """`with GracefulInterrupt() as stop: ... if stop.requested(accelerator): save and exit`."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        self._pending = None  # with several processes: the last call's or-ed flags, read at the next call

    def _handler(self, signum, frame):
        if self.signum is not None:
            logger.warning("second %s: stopping at once (files on disk are complete: saves are atomic)",
                           signal.Signals(signum).name)
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s received: finishing this step, then saving the LoRA and the training state "
                       "(send it again to stop at once)", signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
        return False

    def requested(self, accelerator=None) -> bool:
        """True once a signal came; with several processes, on all of them at the same step. There the flags are
        or-ed by an all-reduce on the device and read at the next call, so that the check never waits for the step
        (issue 6): every process stops one step after the signal, together."""
        flag = self.signum is not None
        if accelerator is None or accelerator.num_processes <= 1:
            return flag
        import torch

        from library.distributed import every_rank
        from library.transfer import HostCopy, to_device

        calm = every_rank(to_device(torch.tensor(not flag), accelerator.device), accelerator)  # no signal anywhere
        previous, self._pending = self._pending, HostCopy(~calm)
        stop = previous is not None and bool(previous.tolist())
        if stop and self.signum is None:
            self.signum = signal.SIGTERM
        return stop

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum) if self.signum is not None else 0


def folds_case(folder: str, names: list[str]) -> bool:
    """Whether `folder`'s file system ignores case (Windows, macOS by default): a listed name with its case swapped
    exists. False when no name can tell (none has letters)."""
    listed = set(names)
    for name in names:
        swapped = name.swapcase()
        if swapped != name and swapped not in listed:
            return os.path.exists(os.path.join(folder, swapped))
    return False


def find_latest_state(output_dir: str, output_name: str | None = None) -> str | None:
    """The newest complete state folder (`*-state` with train_state.json) in `output_dir`, by step then time.

    On a file system that ignores case, `--output_name lora` is the run that wrote `Lora-...-state` (its files
    are the same files), so the name matches whatever its case."""
    import json

    if not os.path.isdir(output_dir):
        return None
    names = os.listdir(output_dir)
    flags = re.IGNORECASE if output_name and folds_case(output_dir, names) else 0
    pattern = re.escape(output_name or "") + r"(?:-step\d+(?:-\d{8}-\d{6})?|-\d+)?-state"
    best = None
    for name in names:
        path = os.path.join(output_dir, name)
        info = os.path.join(path, "train_state.json")
        if not name.endswith("-state") or not os.path.isfile(info):
            continue
        if output_name and not re.fullmatch(pattern, name, flags):
            continue  # another run's state in the same folder (lora_v2-step...-state is not lora's)
        try:
            with open(info, encoding="utf-8") as f:
                step = int(json.load(f)["step"])
        except (OSError, ValueError, KeyError):
            continue
        key = (step, os.path.getmtime(info))
        if best is None or key > best[0]:
            best = (key, path)
    return best[1] if best else None
