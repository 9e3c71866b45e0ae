"""Ctrl-C / SIGTERM: the run finishes its step, saves LoRA and state, says how to resume; --resume latest continues."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from library.tiny_models import write_tiny_model

    root = tmp_path_factory.mktemp("sig")
    write_tiny_model("sd1", str(root / "model"))
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    (root / "ds.toml").write_text(f'[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "{imgs}"\n'
                                  f'  class_tokens = "sks dog"\n')
    return root


def _cmd(root, out, *extra):
    return [sys.executable, os.path.join(ROOT, "train_apt_lora.py"), "--pretrained_model_name_or_path", str(root / "model"),
            "--dataset_config", str(root / "ds.toml"), "--output_dir", str(out), "--output_name", "lora",
            "--network_dim", "4", "--seed", "3", "--apt", "--cache_latents", *extra]


def _start_and_signal(cmd, signals, after_s=3.0, group=False):
    """Start training, wait until its loop runs (the plan line on stdout, then `after_s`), send the signals (with
    `group`, to its whole process group, loader workers included, as a terminal, systemd or SLURM do);
    return (rc, all output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                         start_new_session=group)
    text, deadline = "", time.time() + 120
    while time.time() < deadline and p.poll() is None:
        line = p.stdout.readline()
        text += line
        if "optimizer steps" in line:
            break
    time.sleep(after_s)
    for s in signals:
        os.killpg(p.pid, s) if group else p.send_signal(s)
        time.sleep(0.05)
    rest, _ = p.communicate(timeout=120)
    return p.returncode, text + rest


def test_sigint_saves_state_and_resume_latest_continues(setup, tmp_path):
    out = tmp_path / "out"
    rc, text = _start_and_signal(_cmd(setup, out, "--max_train_steps", "2000"), [signal.SIGINT])
    assert rc == 128 + signal.SIGINT, text[-2000:]
    states = [d for d in os.listdir(out) if d.endswith("-state")]
    assert len(states) == 1 and "--resume" in text and "latest" in text
    info = json.loads((out / states[0] / "train_state.json").read_text())
    step = info["step"]
    assert 1 <= step < 2000
    lora = out / f"lora-step{step:08d}.safetensors"
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_steps"] == str(step)
    # continue to a total of step + 2 steps from the newest state
    rc = subprocess.run(_cmd(setup, out, "--max_train_steps", str(step + 2), "--resume", "latest"), cwd=ROOT,
                        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=180)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert "resumed from" in rc.stdout
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == str(step + 2)
        assert int(f.metadata()["apt_indicator_steps"]) == step + 2


def test_an_interrupt_at_a_step_an_earlier_run_saved_keeps_both(setup, tmp_path):
    """The interrupt's file name (its step) cannot be checked before training: where an earlier run in the folder
    stopped at the same step, the save failed (exit 2, nothing saved) and overwrote that run's γ heatmap first.
    Now the earlier files stay as they were and this run's LoRA and state get a time-stamped name, which
    --resume latest finds."""
    from library.interrupt import find_latest_state

    out = tmp_path / "out"
    out.mkdir()
    for n in range(1, 400):
        for end in (".safetensors", "_gamma.png"):
            (out / f"lora-step{n:08d}{end}").write_bytes(b"an earlier run's file")
    rc, text = _start_and_signal(_cmd(setup, out, "--max_train_steps", "2000"), [signal.SIGINT])
    assert rc == 128 + signal.SIGINT, text[-2000:]
    (state,) = [d for d in os.listdir(out) if d.endswith("-state")]
    step = json.loads((out / state / "train_state.json").read_text())["step"]
    assert re.fullmatch(rf"lora-step{step:08d}-\d{{8}}-\d{{6}}-state", state), state
    assert (out / state.replace("-state", ".safetensors")).is_file() and f"--resume {out / state}" in text
    assert all(p.read_bytes() == b"an earlier run's file" for p in out.iterdir() if p.name.count("-") == 1)
    assert find_latest_state(str(out), "lora") == str(out / state)


def test_sigterm_twice_stops_at_once_and_leaves_only_complete_files(setup, tmp_path):
    out = tmp_path / "out"
    rc, text = _start_and_signal(_cmd(setup, out, "--max_train_steps", "2000", "--save_every_n_steps", "1",
                                      "--save_state"), [signal.SIGTERM, signal.SIGTERM])
    assert rc in (128 + signal.SIGTERM, 130), text[-2000:]
    assert "Traceback" not in text
    for name in os.listdir(out):
        path = out / name
        if name.endswith(".safetensors"):
            with safe_open(str(path), "pt") as f:  # every LoRA left behind loads
                assert len(list(f.keys())) > 0
        elif name.endswith("-state"):
            assert (path / "train_state.json").exists() and (path / "network.safetensors").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_with_loader_workers_saves_once(setup, tmp_path, sig):
    """kill -- -PGID, systemd, SLURM and a terminal's Ctrl-C signal every process of the run, the loader's workers
    too. A SIGTERM killed a worker (torch's handler), and the main process raised "DataLoader worker ... killed by
    signal" mid-step or mid-save: exit 1, no state. The workers ignore both now; the main process stops them."""
    out = tmp_path / "out"
    rc, text = _start_and_signal(_cmd(setup, out, "--max_train_steps", "2000", "--max_data_loader_n_workers", "2",
                                      "--persistent_data_loader_workers"), [sig], group=True)
    assert rc == 128 + sig, text[-2000:]
    assert "killed by signal" not in text
    assert len([d for d in os.listdir(out) if d.endswith("-state")]) == 1
    assert text.count("received: finishing this step") == 1, text[-2000:]  # the workers' handlers said it too


def test_a_second_signal_stops_at_once_and_the_handlers_are_given_back():
    """The first SIGINT only asks for a stop after the step (exit code 128 + 2); a second raises KeyboardInterrupt at
    once (a user pressing Ctrl-C again must not wait for the step and the save); leaving the block puts the earlier
    handlers back, so a program that calls the trainer (a GUI, a notebook) gets its own Ctrl-C handling again."""
    from library.interrupt import GracefulInterrupt

    before = signal.getsignal(signal.SIGINT)
    with GracefulInterrupt() as stop:
        assert signal.getsignal(signal.SIGINT) != before and not stop.requested()
        stop._handler(signal.SIGINT, None)
        assert stop.requested() and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            stop._handler(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) == before
