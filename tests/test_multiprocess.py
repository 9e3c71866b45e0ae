"""Two training processes on CPU (gloo) under `accelerate launch`: the ranks end bit-identical.

Each rank trains on its own shard of the batches; `library.distributed.all_reduce_gradients` averages the LoRA
gradients, and every rank starts from the same seed, so the two ranks' LoRA weights must be equal bit for bit,
and only the main process writes the LoRA files.

How accelerate 1.15 starts CPU processes: `accelerate launch --cpu --num_processes 2` runs ONE process (its simple
launcher; multi-CPU needs mpirun), so the test uses the torchrun launcher (`--multi_gpu`) with
`ACCELERATE_USE_CPU=1`, which makes accelerate pick the MULTI_CPU / gloo backend in each process.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from library.tiny_models import write_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(REPO, "tests", "helpers", "run_rank.py")
STEPS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    model = str(root / "tiny-sd1")
    write_tiny_model("sd1", model)
    images = root / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    dataset = root / "dataset.toml"
    dataset.write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 1\n\n  [[datasets.subsets]]\n'
                       f'  image_dir = "{images.as_posix()}"\n  class_tokens = "sks dog"\n')
    return {"root": root, "model": model, "dataset": str(dataset)}


def _launch(setup, name, *extra, env_extra=None):
    """`accelerate launch` 2 CPU processes of tests/helpers/run_rank.py; returns the process and its folders."""
    root = setup["root"] / name
    out, ranks = root / "out", root / "ranks"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf_home"))  # HF_HOME: no user accelerate config applies
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "--monitor_interval", "0.5",
           HELPER, "--rank_out", str(ranks),
           "--pretrained_model_name_or_path", setup["model"], "--dataset_config", setup["dataset"],
           "--output_dir", str(out), "--output_name", "lora", "--network_dim", "4", "--network_alpha", "4",
           "--max_train_steps", str(STEPS), "--learning_rate", "1e-2", *extra]  # no --overwrite: a 2nd write fails
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    return {"proc": proc, "out": out, "ranks": ranks, "seconds": time.perf_counter() - t0}


def _load_ranks(run, suffix=""):
    return [load_file(str(run["ranks"] / f"rank{r}{suffix}.safetensors")) for r in (0, 1)]


@pytest.fixture(scope="module")
def two_rank_run(setup):
    return _launch(setup, "seeded", "--seed", "1", "--save_every_n_steps", "2", "--apt")  # the plain step: "unseeded"


def _log(run) -> str:
    return f"exit code {run['proc'].returncode}\n--- stdout\n{run['proc'].stdout[-4000:]}\n--- stderr\n{run['proc'].stderr[-6000:]}"


def test_both_ranks_finish_and_save(two_rank_run):
    assert two_rank_run["proc"].returncode == 0, _log(two_rank_run)
    for r in (0, 1):
        assert (two_rank_run["ranks"] / f"rank{r}.safetensors").exists(), _log(two_rank_run)
    # the trainer saw two processes: 4 batches / 2 ranks = 2 steps per epoch, so 3 steps take 2 epochs
    assert "4 batches per epoch, 2 epochs, 3 optimizer steps" in two_rank_run["proc"].stdout, _log(two_rank_run)


def test_ranks_train_on_different_batches(two_rank_run):
    """Otherwise equal weights would prove nothing about the gradient all-reduce."""
    keys = [json.loads((two_rank_run["ranks"] / f"rank{r}_keys.json").read_text()) for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == STEPS
    assert keys[0] != keys[1]
    assert all(a != b for a, b in zip(keys[0][:2], keys[1][:2]))  # epoch 1: the two halves of the 4 images


def test_rank_weights_are_bit_identical_and_trained(two_rank_run):
    init, final = _load_ranks(two_rank_run, "_init"), _load_ranks(two_rank_run)
    assert init[0].keys() == init[1].keys() == final[0].keys() == final[1].keys()
    same_start = [k for k in init[0] if not torch.equal(init[0][k], init[1][k])]
    assert not same_start, f"the ranks start from different LoRA weights: {same_start[:3]}"
    differ = [k for k in final[0] if not torch.equal(final[0][k], final[1][k])]
    assert not differ, (f"{len(differ)} of {len(final[0])} tensors differ between ranks, e.g. {differ[0]}: "
                        f"max |diff| {(final[0][differ[0]] - final[1][differ[0]]).abs().max().item():.3g}")
    weights = [k for k in final[0] if not k.endswith(".alpha")]
    unchanged = [k for k in weights if torch.equal(final[0][k], init[0][k])]
    assert not unchanged, f"{len(unchanged)} of {len(weights)} LoRA weights did not change, e.g. {unchanged[:3]}"


def test_ranks_keep_one_lora_with_latents_cached_to_disk(setup):
    """With --cache_latents_to_disk the main process encodes the images first (drawing VAE samples from its
    generator) and the others read its files: the ranks' generators parted before the LoRA was initialised, so each
    rank trained a LoRA of its own (gradients are averaged, weights never). The caches draw from a generator of
    their own now, and every rank ends with the main process's weights."""
    run = _launch(setup, "disk-cache", "--seed", "5", "--cache_latents", "--cache_latents_to_disk")
    assert run["proc"].returncode == 0, _log(run)
    a, b = _load_ranks(run)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ between ranks, e.g. {differ[0]}"


def test_ranks_draw_from_their_own_random_streams(two_rank_run):
    """One shared stream gave every rank the same noise, timesteps and augmentation: a global batch of two ranks
    had the diversity of one rank's. Rank 1 switches to its own stream after the shared set-up (equal LoRA
    initialisation is checked above)."""
    draws = [json.loads((two_rank_run["ranks"] / f"rank{r}_rng.json").read_text()) for r in (0, 1)]
    assert len(draws[0]) == len(draws[1]) == STEPS
    assert not set(draws[0]) & set(draws[1]), draws


@pytest.mark.parametrize("ahead", [False, True])
def test_two_ranks_resume_exactly(setup, ahead):
    """Each rank's generators are saved with the state and put back on that rank: 4 steps straight equal 1 step,
    then --resume from the step-1 state (mid-epoch: 2 batches a rank) for the other 3, bit for bit (every rank).
    With --apt_prior_ahead every rank has prepared its next step there, and rewinds it before its generators are
    gathered."""
    extra = ["--apt_prior_ahead"] if ahead else []
    straight = _launch(setup, f"resume-straight-{ahead}", "--seed", "3", "--apt", "--max_train_steps", "4",
                       "--save_every_n_steps", "1", "--save_state", *extra)
    assert straight["proc"].returncode == 0, _log(straight)
    state = straight["out"] / "lora-step00000001-state"
    rng = torch.load(str(state / "rng.pt"), weights_only=True)
    assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])
    resumed = _launch(setup, f"resume-second-half-{ahead}", "--apt", "--max_train_steps", "4", "--resume",
                      str(state), *extra)
    assert resumed["proc"].returncode == 0, _log(resumed)
    for r in (0, 1):
        a = load_file(str(straight["ranks"] / f"rank{r}.safetensors"))
        b = load_file(str(resumed["ranks"] / f"rank{r}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"rank {r} differs after --resume"
        a = load_file(str(straight["ranks"] / f"rank{r}_apt.safetensors"))
        b = load_file(str(resumed["ranks"] / f"rank{r}_apt.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"rank {r}'s indicator differs after --resume"


def test_ranks_hold_the_same_apt_indicator(two_rank_run):
    """The indicator is updated from all ranks' samples (gathered), so every rank holds the same state."""
    a, b = _load_ranks(two_rank_run, "_apt")
    assert a.keys() == b.keys() and "indicator.ema_prior" in a
    assert all(torch.equal(a[k], b[k]) for k in a), {k: (a[k], b[k]) for k in a if not torch.equal(a[k], b[k])}
    assert int(a["indicator.step"]) == STEPS and bool(a["indicator.seen"].any())
    # 2 samples (one per rank) per update: the bins were updated with both ranks' samples
    assert int(a["indicator.bin_updates"].sum()) >= STEPS


def test_lora_files_written_once_by_the_main_process(two_rank_run):
    out, proc = two_rank_run["out"], two_rank_run["proc"]
    assert proc.returncode == 0, _log(two_rank_run)  # without --overwrite, a second write of a file would fail
    assert sorted(os.listdir(out)) == ["lora-step00000002.safetensors", "lora-step00000002_gamma.png",
                                       "lora.safetensors", "lora_gamma.png"]  # no leftover temp files
    final = out / "lora.safetensors"
    assert (proc.stdout + proc.stderr).count(f"saved {final}") == 1
    rank0 = load_file(str(two_rank_run["ranks"] / "rank0.safetensors"))
    with safe_open(str(final), "pt") as f:
        assert set(f.keys()) == set(rank0)
        assert all(torch.equal(f.get_tensor(k), rank0[k]) for k in rank0)
        assert f.metadata()["ss_steps"] == str(STEPS)


def test_ranks_agree_without_seed(setup):
    run = _launch(setup, "unseeded")
    assert run["proc"].returncode == 0, _log(run)
    for init_or_final in ("_init", ""):
        a, b = _load_ranks(run, init_or_final)
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"rank{init_or_final} weights: {len(differ)} of {len(a)} tensors differ, e.g. {differ[0]}"


def test_a_failing_rank_stops_the_others_with_its_error(setup):
    """Rank 1 crashes at its second step while rank 0 waits in a collective: the launcher stops both, with the
    error, instead of hanging until the gloo timeout (30 min)."""
    run = _launch(setup, "failing", "--seed", "1", "--apt", env_extra={"APT_TEST_FAIL_RANK": "1"})
    assert run["proc"].returncode != 0
    assert "injected failure on rank 1" in run["proc"].stdout + run["proc"].stderr
    assert run["seconds"] < 120, f"took {run['seconds']:.0f} s"


@pytest.mark.parametrize("defer", ["off", "on"])
def test_a_nan_on_one_rank_drops_the_update_on_both(setup, defer):
    """Rank 1's second loss is NaN: both ranks drop that update (read at once: `any_rank`; with --defer_step_read
    on the device: `every_rank`), say so, and end bit-identical and finite. Read at once the dropped step does not
    count (each rank trains on 4 batches); deferred it does (3)."""
    run = _launch(setup, f"nan-{defer}", "--seed", "1", "--defer_step_read", defer, "--optimizer_args", "fused=True",
                  env_extra={"APT_TEST_NAN_RANK": "1"})
    assert run["proc"].returncode == 0, _log(run)
    out = run["proc"].stdout + run["proc"].stderr
    # rank 1 names its loss; rank 0 its gradients (the all-reduce brought rank 1's NaN into them)
    assert "non-finite loss (images: " in out and out.count("non-finite") == 2, _log(run)
    a, b = _load_ranks(run)
    assert all(torch.equal(a[k], b[k]) and torch.isfinite(a[k]).all() for k in a)
    keys = [json.loads((run["ranks"] / f"rank{r}_keys.json").read_text()) for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == (STEPS + 1 if defer == "off" else STEPS)


def test_a_signal_on_one_rank_stops_both_at_the_same_step_with_one_state(setup):
    """Ctrl-C reaches rank 1 alone (at its second step): both ranks stop after the same step, the main process
    saves the LoRA and the state for --resume once, and the run exits with the signal's code."""
    run = _launch(setup, "signal", "--seed", "1", "--max_train_steps", "8", env_extra={"APT_TEST_SIGNAL_RANK": "1"})
    assert run["proc"].returncode != 0, _log(run)
    keys = [json.loads((run["ranks"] / f"rank{r}_keys.json").read_text()) for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) and 2 <= len(keys[0]) < 8, (keys, _log(run))
    states = [d for d in os.listdir(run["out"]) if d.endswith("-state")]
    assert len(states) == 1, _log(run)
    info = json.loads((run["out"] / states[0] / "train_state.json").read_text())
    assert info["step"] == len(keys[0]), (info, _log(run))
    assert "--resume" in run["proc"].stdout + run["proc"].stderr


def test_ranks_with_unequal_batches_update_the_indicator_alike(setup):
    """3 images in batches of 2: one rank holds 2 samples, the other 1. The indicator rows are padded to the
    datasets' batch size (known to both ranks, so no rank asks the others): the same state on both ranks as when
    the padding is agreed by an all-reduce (the path without a bound)."""
    root = setup["root"] / "unequal"
    (root / "imgs").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * (i + 1), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
    dataset = root / "dataset.toml"
    dataset.write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 2\n\n  [[datasets.subsets]]\n'
                       f'  image_dir = "{(root / "imgs").as_posix()}"\n  class_tokens = "sks dog"\n')
    states = []
    for name, env in (("bound", {}), ("all-reduce", {"APT_TEST_NO_MAX_ROWS": "1"})):
        run = _launch(dict(setup, dataset=str(dataset)), f"unequal-{name}", "--seed", "1", "--apt",
                      "--max_train_steps", "1", env_extra=env)
        assert run["proc"].returncode == 0, _log(run)
        keys = [json.loads((run["ranks"] / f"rank{r}_keys.json").read_text()) for r in (0, 1)]
        assert sorted(len(k[0]) for k in keys) == [1, 2], keys
        a, b = _load_ranks(run, "_apt")
        assert all(torch.equal(a[k], b[k]) for k in a) and int(a["indicator.step"]) == 1
        states.append(a)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert int(states[0]["indicator.bin_updates"].sum()) >= 2  # the 3 samples, in 2 or 3 bins


def test_two_ranks_share_the_validation_and_report_the_one_process_value(setup, tmp_path, capsys):
    """validation_split 0.5 of 4 images: 2 held-out batches, one validated by each rank and summed by one
    all-reduce. At a learning rate of 1e-30 the LoRA stays at its start (up = 0) to the printed precision, so the
    loss must equal a one-process run's on the same images: the split, the per-batch noise and the reduction agree."""
    import re

    import train_apt_lora

    dataset = tmp_path / "val.toml"
    dataset.write_text(open(setup["dataset"]).read().replace("batch_size = 1\n", "batch_size = 1\nvalidation_split = 0.5\n"))
    assert "validation_split" in dataset.read_text()
    run = _launch(dict(setup, dataset=str(dataset)), "validation", "--seed", "1", "--learning_rate", "1e-30",
                  "--max_train_steps", "1")
    assert run["proc"].returncode == 0, _log(run)
    found = re.findall(r"validation loss (\S+) at step 1", run["proc"].stdout + run["proc"].stderr)
    assert "2 held-out images, 2 batches" in run["proc"].stdout and len(found) == 1, _log(run)
    assert train_apt_lora.main(["--pretrained_model_name_or_path", setup["model"], "--dataset_config", str(dataset),
                                "--output_dir", str(tmp_path / "one"), "--network_dim", "4", "--network_alpha", "4",
                                "--seed", "1", "--learning_rate", "1e-30", "--max_train_steps", "1"]) == 0
    out = capsys.readouterr()
    assert re.findall(r"validation loss (\S+) at step 1", out.out + out.err) == found
