"""SIGKILL at any moment of a save leaves the old complete file or the new one, never a truncated one."""
import json
import os
import random
import signal
import subprocess
import sys
import time

from safetensors import safe_open

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "save_loop.py")


def _check_complete(out):
    """Every LoRA and state left behind loads; returns the step of the LoRA file (or None)."""
    step = None
    lora = os.path.join(out, "lora.safetensors")
    if os.path.exists(lora):
        with safe_open(lora, "pt") as f:
            step = int(f.metadata()["ss_steps"])
            for k in f.keys():  # every tensor readable, and all from the same save
                assert float(f.get_tensor(k).flatten()[0]) == step
    state = os.path.join(out, "lora-state")
    if os.path.exists(state):
        info = json.load(open(os.path.join(state, "train_state.json")))
        with safe_open(os.path.join(state, "network.safetensors"), "pt") as f:
            assert all(float(f.get_tensor(k).flatten()[0]) == info["step"] for k in f.keys() if not k.endswith(".alpha"))
    return step


def test_sigkill_during_saves_never_leaves_a_truncated_file(tmp_path):
    out = str(tmp_path)
    rng = random.Random(0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, HELPER, out], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "ready"
    kills, seen_steps = 0, set()
    try:
        for _ in range(12):  # kill at random moments, restart, repeat
            time.sleep(rng.uniform(0.02, 0.4))
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            step = _check_complete(out)
            from library.safe_io import remove_stale_temp_files

            remove_stale_temp_files(out)
            assert sorted(os.listdir(out)) in (["lora-state", "lora.safetensors"], ["lora.safetensors"], []), os.listdir(out)
            if step is not None:
                seen_steps.add(step)
            p = subprocess.Popen([sys.executable, HELPER, out], stdout=subprocess.PIPE, text=True, env=env)
            assert p.stdout.readline().strip() == "ready"
    finally:
        p.kill()
        p.wait()
    assert kills == 12 and len(seen_steps) > 1  # saves really happened between kills
