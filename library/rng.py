"""The process's random number generators as one state: torch CPU (and CUDA once initialised, MPS), Python `random`,
NumPy. Saved with a training state (library/train_state.py), put back after sampling (library/sampling.py), and
rewound by --apt_prior_ahead (apt_ext/prior_ahead.py). The NumPy key array is kept as an int64 tensor so that
the state loads with `torch.load(weights_only=True)`.

With several processes every rank starts from one seed (the LoRA's initialisation must be identical), then ranks
1.. switch to streams of their own (`seed_rank_stream`), so that the ranks draw different noise, timesteps and
augmentation: one shared stream would give a global batch of N ranks the diversity of one rank's batch."""
from __future__ import annotations

import contextlib
import hashlib
import random

import numpy as np
import torch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():  # Apple silicon: the training noise is drawn on the device
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s own stream (a hash, so that no rank's stream is another seed's rank 0), started at
    optimizer step `step` (a run resumed from a state saved by fewer processes). Below 2**32, as NumPy needs."""
    digest = hashlib.sha256(f"apt-lora/{seed}/rank{rank}/step{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_rank_stream(seed: int, rank: int, step: int = 0) -> None:
    """Rank `rank` (≥ 1) draws from its own stream from here on; rank 0 keeps the stream it has, so a
    single-process run is the same with or without this call."""
    if rank == 0:
        return
    s = rank_seed(seed, rank, step)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # every CUDA device too


@contextlib.contextmanager
def preserved_rng_state():
    """Every generator's state restored on exit."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
