"""The process's random number generators as one state: torch CPU (and CUDA once initialised), Python `random`,
NumPy. Saved with a training state (library/train_state.py), put back after sampling (library/sampling.py), and
rewound by --apt_prior_ahead (apt_ext/prior_ahead.py). The NumPy key array is kept as an int64 tensor so that
the state loads with `torch.load(weights_only=True)`."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng_state():
    """Every generator's state restored on exit."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
