"""Test setup: never touch the network, keep torch on few threads (CI has 2 cores)."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threading overhead dominates, and a shared 2-core CPU makes 2 threads far slower (OpenMP spinning); the one place tests set it


import pytest  # noqa: E402


@pytest.fixture
def nan_steps(monkeypatch):
    """`nan_steps(bad)`: the trainer's plain step returns a NaN loss on the calls `bad(n)` picks (n from 1);
    returns the call counter {"n": calls so far}, which a test may reset."""
    import train_apt_lora

    real_step = train_apt_lora.plain_step

    def install(bad):
        calls = {"n": 0}

        def step(args, ctx, batch):
            calls["n"] += 1
            loss, logs = real_step(args, ctx, batch)
            return (loss * float("nan") if bad(calls["n"]) else loss), logs

        monkeypatch.setattr(train_apt_lora, "plain_step", step)
        return calls

    return install
