"""The full training state (for `--save_state` / `--resume`): save it atomically, load it back exactly.

A state folder holds everything that decides the rest of a run, so that N steps straight and
N/2 + resume + N/2 give the same LoRA:

    network.safetensors     LoRA weights in float32 (kohya keys), whatever --save_precision says
    optimizer.pt            optimizer.state_dict()          (torch.save; loaded with weights_only=True)
    lr_scheduler.pt         lr_scheduler.state_dict()
    rng.pt                  torch CPU (and CUDA) RNG, Python `random`, NumPy; with several processes,
                            {"ranks": [...]}: every rank's (each draws its own stream, library/rng.py)
    apt.safetensors         APT indicator state and γ history (when APT runs)
    train_state.json        step, epoch, batches done in the epoch, seed

The folder is written under a temporary name (files flushed) and renamed when complete, so a crash never
leaves a half-written state that `--resume` would trust. Replacing a state (`--overwrite`) first moves the
old folder aside (`.old-<pid>`), then renames the new one in, then deletes the old: a kill in between
leaves the old complete state under that name.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from library.rng import rng_state, seed_rank_stream, set_rng_state
from library.safe_io import SaveError

STATE_VERSION = 1
STATE_FILES = frozenset({"network.safetensors", "optimizer.pt", "lr_scheduler.pt", "rng.pt", "apt.safetensors",
                         "train_state.json"})  # all a state folder holds (library/safe_io's cleanup tells by them)


class StateError(Exception):
    """A user-facing error about a state folder (missing, incomplete, from another run)."""


def _fsync_tree(folder: str) -> None:
    """Flush every file and the folder itself, so the rename publishes complete data."""
    from library.safe_io import fsync_dir, fsync_file

    for name in os.listdir(folder):
        fsync_file(os.path.join(folder, name))
    fsync_dir(folder)


def save_state(folder: str, *, network, optimizer, lr_scheduler, step: int, epoch: int, batches_done: int, seed: int,
               apt_state: dict | None = None, overwrite: bool = False, rng_states: list | None = None) -> str:
    """Write a complete state folder atomically. Refuses an existing folder unless `overwrite`. `rng_states`: every
    process's `rng_state()` in rank order (this process's alone when None)."""
    if os.path.exists(folder) and not overwrite:
        raise FileExistsError(f"state folder exists: {folder}; pass --overwrite to replace it")
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rng_states = rng_states or [rng_state()]
    network_sd = {k: v.detach().float().cpu().contiguous() for k, v in network.state_dict().items()}
    optimizer_sd, scheduler_sd = optimizer.state_dict(), lr_scheduler.state_dict()  # taken before any write: an
    try:  # error below is the file system's (torch.save's full disk is a RuntimeError, "unexpected pos ...")
        os.makedirs(tmp)
        save_file(network_sd, os.path.join(tmp, "network.safetensors"))
        torch.save(optimizer_sd, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler_sd, os.path.join(tmp, "lr_scheduler.pt"))
        torch.save(rng_states[0] if len(rng_states) == 1 else {"ranks": rng_states}, os.path.join(tmp, "rng.pt"))
        if apt_state:
            save_file({k: v.contiguous() for k, v in apt_state.items()}, os.path.join(tmp, "apt.safetensors"))
        with open(os.path.join(tmp, "train_state.json"), "w", encoding="utf-8") as f:
            json.dump({"version": STATE_VERSION, "step": step, "epoch": epoch, "batches_done": batches_done,
                       "seed": seed}, f)
        _fsync_tree(tmp)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(f"cannot write the training state {folder}: {e}") from e
    old = None
    if os.path.exists(folder):  # keep the old state until the new one is in place
        old = f"{folder}.old-{os.getpid()}"
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def initial_position(args, steps_per_epoch: int) -> tuple[int, int, int]:
    """Where a run without a state starts: (optimizer steps done, epoch (1-based), micro-batches of that epoch to
    skip). sd-scripts' `--initial_step`, or `--initial_epoch` as that epoch's first step; `(0, 1, 0)` without them.
    The epoch's batches are skipped only with `--skip_until_initial_step` (each epoch's batch order is a function of
    (seed, epoch), so the run then sees the batches of the uninterrupted run); without it the epoch starts at its
    first batch, as in sd-scripts."""
    if args.initial_step is not None:
        step = args.initial_step
    elif args.initial_epoch is not None:
        step = (args.initial_epoch - 1) * steps_per_epoch
    else:
        return 0, 1, 0
    skip = (step % steps_per_epoch) * args.gradient_accumulation_steps if args.skip_until_initial_step else 0
    return step, step // steps_per_epoch + 1, skip


def past_epoch_end(args, start: tuple[int, int, int], batches_per_epoch: int, num_epochs: int) -> tuple[int, int, int]:
    """Where a resumed run starts when its state was saved after an epoch's last batch (a `--save_every_n_steps`
    state at that step, or an interrupt there): before that epoch's end (its LoRA, samples, validation), which the
    earlier run may have passed already. When the epoch's LoRA was due and exists, it did: start with the next
    epoch (its end was refused as an existing output file before). Otherwise the end is replayed, so that a run
    killed between the two saves still writes it (sd-scripts goes on with the next epoch either way)."""
    from library.train_util import ckpt_name

    step, epoch, done = start
    every = args.save_every_n_epochs
    if done < batches_per_epoch or not every or epoch % every or epoch >= num_epochs:
        return start
    if os.path.exists(os.path.join(args.output_dir, ckpt_name(args.output_name, epoch=epoch))):
        return step, epoch + 1, 0
    return start


def advance_schedule(lr_scheduler, steps: int) -> None:
    """Step the learning-rate schedule `steps` times before training, so a run started at `--initial_step` gets the
    learning rate of that step (torch warns about a schedule stepped before its optimizer: expected here)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            lr_scheduler.step()


_DAMAGED = "the state is damaged: resume from another state folder (an earlier <name>-step<N>-state)"


def read_state_info(folder: str) -> dict:
    """train_state.json of a state folder (step, epoch, batches_done, seed)."""
    info_path = os.path.join(folder, "train_state.json")
    if not os.path.isdir(folder):
        raise StateError(f"--resume {folder}: no such folder (pass a <name>-step<N>-state folder written by --save_state)")
    if not os.path.exists(info_path):
        raise StateError(f"--resume {folder}: train_state.json is missing; this is not a complete state folder")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        for key in ("step", "epoch", "batches_done"):
            int(info[key])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StateError(f"--resume {folder}: train_state.json cannot be read ({type(e).__name__}: {e}); "
                         f"{_DAMAGED}") from None
    return info


def _read(folder: str, name: str, loader):
    """One file of the state; a missing or unreadable one is a StateError naming it."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise StateError(f"--resume {folder}: {name} is missing; {_DAMAGED}")
    try:
        return loader(path)
    except Exception as e:  # noqa: BLE001 - safetensors, torch and pickle errors alike: the file is damaged
        raise StateError(f"--resume {folder}: {name} cannot be read ({type(e).__name__}: {e}); {_DAMAGED}") from None


def _load_into(folder: str, what: str, target, state, advice: str) -> None:
    try:
        target.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise StateError(f"--resume {folder}: the saved {what} does not fit this run ({type(e).__name__}: {e}); "
                         f"{advice}") from None


def load_state(folder: str, *, network, optimizer, lr_scheduler, apt=None, rank: int = 0) -> dict:
    """Restore a state folder into the given objects (and this process's RNGs: rank `rank`'s); returns
    train_state.json's dict, with "rng_ranks": how many processes' generators it held (a rank beyond them starts
    a new stream of its own, library/rng.seed_rank_stream). A damaged folder, or one from a run with another LoRA
    shape, alpha, optimizer or schedule, is a StateError that says so."""
    info = read_state_info(folder)
    sd = _read(folder, "network.safetensors", load_file)
    ours = network.state_dict()
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    same_run = "resume with the same --network_dim/--network_alpha/--network_args/model as the saved run"
    if missing or unexpected:
        raise StateError(f"--resume {folder}: the saved LoRA does not match this network ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[:2]}); {same_run}")
    shape = [k for k in sd if tuple(sd[k].shape) != tuple(ours[k].shape)]
    if shape:
        raise StateError(f"--resume {folder}: the saved LoRA has another rank ({shape[0]} is {list(sd[shape[0]].shape)}, "
                         f"this network's {list(ours[shape[0]].shape)}); {same_run}")
    alpha = [k for k in sd if k.endswith(".alpha") and float(sd[k]) != float(ours[k])]
    if alpha:  # the scale was alpha / rank: another alpha would train the rest at another strength
        raise StateError(f"--resume {folder}: the saved LoRA has alpha {float(sd[alpha[0]]):g} where this network has "
                         f"{float(ours[alpha[0]]):g} ({alpha[0]}); {same_run}")
    network.load_state_dict(sd, strict=False)
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    same_optimizer = ("resume with the same --optimizer_type, --optimizer_args and learning rates (a part at learning "
                      "rate 0 has no optimizer group) as the saved run")
    needs = [set(g) for g in optimizer.param_groups]
    _load_into(folder, "optimizer state", optimizer, _read(folder, "optimizer.pt", load), same_optimizer)
    lacking = [sorted(n - set(g)) for n, g in zip(needs, optimizer.param_groups) if n - set(g)]
    if lacking:  # torch takes the saved groups whole, with the defaults of its own newer keys only
        raise StateError(f"--resume {folder}: the saved optimizer state does not fit this run (its groups lack "
                         f"{', '.join(lacking[0])}: another optimizer's); {same_optimizer}")
    _load_into(folder, "learning-rate schedule", lr_scheduler, _read(folder, "lr_scheduler.pt", load),
               "resume with the same --lr_scheduler and its arguments as the saved run")
    if apt is not None:
        if not os.path.exists(os.path.join(folder, "apt.safetensors")):
            raise StateError(f"--resume {folder}: the state has no APT indicator (the run was not trained with APT)")
        _load_into(folder, "APT indicator", apt, _read(folder, "apt.safetensors", load_file),
                   "resume with the same --apt settings as the saved run")
    saved = _read(folder, "rng.pt", load)
    ranks = saved["ranks"] if "ranks" in saved else [saved]
    if rank < len(ranks):
        set_rng_state(ranks[rank])
    else:
        seed_rank_stream(int(info.get("seed") or 0), rank, int(info["step"]))
    return dict(info, rng_ranks=len(ranks))
