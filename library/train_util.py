"""Training setup shared by the entry point and the helpers (KOHYA_COMPAT.md section 6): the user-facing
`TrainingSetupError`, the flag reader `_arg`, output file names and dtypes, and the output-location check.

Noise and targets are in library/noise.py, losses and their weighting in library/losses.py, optimizers and LR
schedules in library/optimizers.py. Everything reads the training flags from an `argparse.Namespace` with
`getattr` defaults, so a namespace that lacks a flag behaves as if the flag was not given (None / 0 / False = off).
Errors the user can fix are raised as `TrainingSetupError`, whose message names the flag and says what to do.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Optional

import torch

logger = logging.getLogger(__name__)


class TrainingSetupError(Exception):
    """A user-facing setup error (bad flag, missing optional package, bad config file).

    The message names the flag, key or file and says what to do; the CLI prints it without a traceback.
    """


def _arg(args, name: str, default=None):
    """`getattr` with a default that also applies when the attribute is None (a flag left unset)."""
    value = getattr(args, name, None) if args is not None else None
    return default if value is None else value


def set_unet_layout(unet, args) -> None:
    """--channels_last: the UNet's 4-d weights in channels_last (NHWC) layout; convolutions then run NHWC and
    pass that layout on. The LoRA weights keep theirs (their convs are 1x1 or small)."""
    if getattr(args, "channels_last", False):
        unet.to(memory_format=torch.channels_last)


def accelerator_handlers(args) -> list:
    """accelerate's kwargs handlers for the flags that configure it: --ddp_timeout (minutes) as the process
    group's timeout, as sd-scripts passes it."""
    minutes = getattr(args, "ddp_timeout", None)
    if not minutes:
        return []
    import datetime

    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=minutes))]


# ---------------------------------------------------------------------------------------------------------------
# File names and dtypes
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_EPOCH_NAME = "epoch"
DEFAULT_LAST_OUTPUT_NAME = "last"
DEFAULT_STEP_NAME = "at"


def _ext(ext: str) -> str:
    return ext if not ext or ext.startswith(".") else "." + ext


def ckpt_name(output_name: Optional[str], ext: str = ".safetensors", epoch: Optional[int] = None,
              step: Optional[int] = None) -> str:
    """sd-scripts file names: `{name}.safetensors`, `{name}-{epoch:06d}...`, `{name}-step{step:08d}...`.

    `ckpt_name(None, ...)` gives sd-scripts' names without `--output_name` (`last`, `epoch-000001`,
    `at-step00000100`); the trainer itself names every file of such a run `last...` (one stem for its files, states,
    grid and `--resume latest`: library/args_check.py).
    """
    if epoch is not None and step is not None:
        raise ValueError("ckpt_name: give epoch or step, not both")
    if epoch is not None:
        return f"{output_name or DEFAULT_EPOCH_NAME}-{int(epoch):06d}{_ext(ext)}"
    if step is not None:
        return f"{output_name or DEFAULT_STEP_NAME}-step{int(step):08d}{_ext(ext)}"
    return f"{output_name or DEFAULT_LAST_OUTPUT_NAME}{_ext(ext)}"


def state_dir_name(output_name: Optional[str], epoch: Optional[int] = None, step: Optional[int] = None) -> str:
    """Training-state folder names: `{name}-{epoch:06d}-state`, `{name}-step{step:08d}-state`, `{name}-state`."""
    return ckpt_name(output_name, ext="", epoch=epoch, step=step) + "-state"


def rotated_out(args, epoch: Optional[int] = None, step: Optional[int] = None) -> tuple[Optional[str], Optional[str]]:
    """--save_last_n_epochs / --save_last_n_steps and their `_state` variants (which default to them): the LoRA file
    and the state folder that the save at `epoch` or `step` pushes out of the kept window, as sd-scripts computes
    them (None: nothing). Epochs count saves (N saves kept); steps are a distance (the saves of the last N steps).
    State folders only when this run writes them (`--save_state`), as in sd-scripts: a run without it must not
    delete the states of an earlier run in the folder."""
    def number(last_n):
        if not last_n:
            return None
        if epoch is not None:
            no = epoch - args.save_every_n_epochs * last_n  # the save N saves back
        else:
            no = step - last_n - 1
            no -= no % args.save_every_n_steps  # the newest save older than the last N steps
        return no if no > 0 else None

    kind, key = ("epochs", "epoch") if epoch is not None else ("steps", "step")
    last_n = getattr(args, f"save_last_n_{kind}", None)
    lora = number(last_n)
    state = number(getattr(args, f"save_last_n_{kind}_state", None) or last_n) if getattr(args, "save_state", False) else None
    return (None if lora is None else ckpt_name(args.output_name, **{key: lora}),
            None if state is None else state_dir_name(args.output_name, **{key: state}))


def remove_old_save(output_dir: str, lora_name: Optional[str], state_name: Optional[str]) -> list[str]:
    """Delete a save that `rotated_out` named: the LoRA file and its γ heatmap, and the state folder (only when it
    holds a train_state.json: a folder of ours). What is not there is skipped. Returns the paths removed."""
    import shutil

    doomed = []
    if lora_name:
        doomed += [p for p in (os.path.join(output_dir, lora_name),
                               os.path.join(output_dir, os.path.splitext(lora_name)[0] + "_gamma.png"))
                   if os.path.isfile(p)]
    if state_name and os.path.isfile(os.path.join(output_dir, state_name, "train_state.json")):
        doomed.append(os.path.join(output_dir, state_name))
    removed = []
    for path in doomed:
        try:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
        except OSError as e:  # Windows: open in another program (a UI testing the LoRA); the run goes on
            logger.warning("--save_last_n_*: could not remove %s (%s); delete it when nothing uses it",
                           path, e.strerror or e)
    return removed


_PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(mixed_precision: Optional[str]) -> torch.dtype:
    """The dtype of the frozen base weights: fp16 / bf16 under `--mixed_precision`, else float32."""
    if mixed_precision in (None, "no", "fp32", "float"):
        return torch.float32
    if mixed_precision == "fp16":
        return torch.float16
    if mixed_precision == "bf16":
        return torch.bfloat16
    raise TrainingSetupError(f"--mixed_precision {mixed_precision!r} is not known; choose no, fp16 or bf16")


def save_dtype(args) -> torch.dtype:
    """The dtype LoRA files are written in: `--save_precision` (float / fp16 / bf16).

    Without it sd-scripts keeps the training dtype of the network: fp16 / bf16 under `--full_fp16` /
    `--full_bf16`, otherwise float32.
    """
    precision = getattr(args, "save_precision", None)
    if precision is None:
        if getattr(args, "full_fp16", False):
            return torch.float16
        if getattr(args, "full_bf16", False):
            return torch.bfloat16
        return torch.float32
    if precision not in _PRECISIONS:
        raise TrainingSetupError(f"--save_precision {precision!r} is not known; choose float, fp16 or bf16")
    return _PRECISIONS[precision]


# ---------------------------------------------------------------------------------------------------------------
# Output location (checked before anything is loaded or trained; docs/reliability.md)
# ---------------------------------------------------------------------------------------------------------------

# the longest suffix a run adds to --output_name: "-step00000000-state" folders, "-step00000000.safetensors" files,
# an interrupt's time stamp when an earlier run's save holds its name (train_apt_lora), and the temporary name a
# file is first written under (library/safe_io._atomic_write: "." before, ".<pid up to 7 digits>.<8 random>.tmp"
# after): the longest name that exists on disk during a run
_LONGEST_OUTPUT_SUFFIX = len("-step00000000-20261207-220000.safetensors") + len("." + ".4194304.abcdefgh.tmp")
_NAME_MAX = 255  # bytes per file name on ext4, NTFS, APFS


def check_output_location(args) -> None:
    """Refuse an `--output_name` that is not a plain file name stem and an `--output_dir` that cannot be written,
    before training starts (not after hours of it). Raises TrainingSetupError naming the flag.

    `--output_name`: not empty, no path separator (`/` or `\\`), no `..`, no control characters, short enough for
    the longest file name a run writes. `--output_dir`: the folder, or the nearest existing folder above it (it is
    created later), must be a folder in which a file can be created (probed with a temporary file that is removed at
    once; as root this is the real test, permission bits do not stop root). Nothing is created or left behind.
    """
    import tempfile

    name = getattr(args, "output_name", None)
    if name is not None:
        if not str(name).strip():
            raise TrainingSetupError('--output_name is empty: give a file name stem such as "my_lora" (or leave the '
                                     'flag out, which names the files "last", "last-000001", ...)')
        seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
        if any(s in name for s in seps):
            raise TrainingSetupError(
                f"--output_name {name!r} contains a path separator: it is a file name stem, not a path. Put the "
                f"folder in --output_dir and only the name in --output_name (e.g. --output_dir out/sub --output_name "
                f"my_lora)")
        if ".." in name:
            raise TrainingSetupError(f"--output_name {name!r} contains '..'; use a plain file name stem such as "
                                     f"\"my_lora\" (the folder goes in --output_dir)")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise TrainingSetupError(f"--output_name {name!r} contains a control character; use a plain file name "
                                     f"stem such as \"my_lora\"")
        bad = sorted(set(name) & set('<>:"|?*'))
        reserved = re.fullmatch(r"(?i)(con|prn|aux|nul|com[1-9]|lpt[1-9])(\..*)?", name)
        if bad or reserved:  # LoRA files travel to Windows (and may be written there)
            why = (f"the character{'s' if len(bad) > 1 else ''} {' '.join(bad)}" if bad else
                   f"the device name {reserved.group(1).upper()}")
            raise TrainingSetupError(f"--output_name {name!r} has {why}, which Windows does not allow in a file name "
                                     f"(the run would fail at its first save there, and the file cannot be copied to "
                                     f"Windows); use letters, digits, '-', '_' or '.' such as \"my_lora_v2\"")
        if len(name.encode("utf-8", "surrogateescape")) + _LONGEST_OUTPUT_SUFFIX > _NAME_MAX:
            raise TrainingSetupError(f"--output_name is too long ({len(name)} characters): with the suffixes a run "
                                     f"adds (e.g. -step00000100.safetensors) file names must stay under "
                                     f"{_NAME_MAX} bytes; use at most {_NAME_MAX - _LONGEST_OUTPUT_SUFFIX}")

    out = getattr(args, "output_dir", None)
    if not out:
        return  # required elsewhere (verify_args)
    from library.safe_io import nearest_existing

    path = os.path.abspath(os.fspath(out))
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        what = "a broken link" if os.path.islink(existing) else "a file, not a folder"
        problem = f"it is {what}" if existing == path else f"cannot create the folder: {existing} is {what}"
        raise TrainingSetupError(f"--output_dir {out}: {problem}; choose another --output_dir")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".apt-lora-write-test-"):
            pass
    except OSError as e:
        where = "it" if existing == path else f"{existing} (where it would be created)"
        raise TrainingSetupError(f"--output_dir {out}: cannot write in {where}: {e.strerror or e}. Choose a folder you "
                                 f"can write to, or fix its permissions") from None

