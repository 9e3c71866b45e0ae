"""--resume with a state that does not fit: a damaged folder, another run's LoRA rank, alpha, optimizer or seed, and
`--resume latest` among several runs' states. Each is an error line naming the folder and what to do (they were raw
tracebacks, or for the alpha and the seed a silent continuation); a run started without --seed resumes with its
own seed."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_apt_lora
from library.interrupt import find_latest_state


def _run(world, out, *extra):
    return train_apt_lora.main(["--pretrained_model_name_or_path", world.model("sd1"), "--dataset_config",
                                world.dataset, "--output_dir", str(out), "--output_name", "lora", "--network_dim", "4",
                                "--network_alpha", "4", "--learning_rate", "1e-3", "--max_train_steps", "4", *extra])


@pytest.fixture(scope="module")
def straight(tiny_world, tmp_path_factory):
    """4 steps without --seed (a random one), a state saved at step 2."""
    out = tmp_path_factory.mktemp("straight")
    assert _run(tiny_world, out, "--save_every_n_steps", "2", "--save_state") == 0
    return out


def _state_copy(straight, tmp_path):
    """A fresh folder holding only the step-2 state (as if the run stopped after it)."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(straight / "lora-step00000002-state", out / "lora-step00000002-state")
    return out, out / "lora-step00000002-state"


def test_a_run_without_seed_resumes_with_its_own(tiny_world, straight, tmp_path, capsys):
    out, state = _state_copy(straight, tmp_path)
    assert _run(tiny_world, out, "--resume", str(state)) == 0
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(out / "lora.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # the uninterrupted run, bit for bit
    seed = json.loads((state / "train_state.json").read_text())["seed"]
    assert _run(tiny_world, tmp_path / "other", "--resume", str(state), "--seed", str(seed + 1)) == 2
    assert (f"was saved by a run with --seed {seed}, and the seed decides the batch order, the validation split and "
            f"every draw: leave --seed out (the state's is used) or pass --seed {seed}") in capsys.readouterr().err


@pytest.mark.parametrize("damage, extra, message", [
    ("optimizer.pt", [], "optimizer.pt is missing; the state is damaged: resume from another state folder"),
    ("network.safetensors", [], "network.safetensors cannot be read"),
    ("train_state.json", [], "train_state.json cannot be read"),
    (None, ["--network_dim", "8", "--network_alpha", "8"], "the saved LoRA has another rank"),
    (None, ["--network_alpha", "1"], "the saved LoRA has alpha 4 where this network has 1"),
    (None, ["--optimizer_type", "SGDNesterov"], "the saved optimizer state does not fit this run"),
], ids=["missing", "truncated", "bad-json", "rank", "alpha", "optimizer"])
def test_a_state_that_does_not_fit_is_an_error(tiny_world, straight, tmp_path, capsys, damage, extra, message):
    out, state = _state_copy(straight, tmp_path)
    if damage == "optimizer.pt":
        (state / damage).unlink()
    elif damage == "network.safetensors":
        data = (state / damage).read_bytes()
        (state / damage).write_bytes(data[: len(data) // 2])
    elif damage == "train_state.json":
        (state / damage).write_text('{"step": 2, "epo')
    assert _run(tiny_world, out, "--resume", str(state), *extra) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (above it: the model's loading bar)
    assert message in last and last.startswith("error: --resume ") and "Traceback" not in err, err


def test_resume_latest_takes_this_runs_state_only(tmp_path):
    for name, step in (("lora-step00000004-state", 4), ("lora_v2-step00000100-state", 100),
                       ("lora-000002-state", 3), ("lora-state", 2)):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "train_state.json").write_text(json.dumps({"step": step}))
    assert find_latest_state(str(tmp_path), "lora") == str(tmp_path / "lora-step00000004-state")
    assert find_latest_state(str(tmp_path), "lora_v2") == str(tmp_path / "lora_v2-step00000100-state")


def test_resume_latest_finds_a_state_whose_name_differs_only_in_case_where_case_is_ignored(tmp_path, monkeypatch):
    """Windows/macOS: a run saved `Lora-step...-state`, the next says `--output_name lora`; the file system treats
    the two names as one, so `--resume latest` must too (it said "no saved state"). Where case matters they are two
    runs."""
    import library.interrupt as interrupt

    os.makedirs(tmp_path / "Lora-step00000004-state")
    (tmp_path / "Lora-step00000004-state" / "train_state.json").write_text(json.dumps({"step": 4}))
    assert not interrupt.folds_case(str(tmp_path), os.listdir(tmp_path))  # this Linux tmp keeps case
    assert find_latest_state(str(tmp_path), "lora") is None
    real_exists = os.path.exists

    def folded_exists(path):
        folder, name = os.path.split(path)
        return real_exists(path) or (os.path.isdir(folder) and name.lower() in {n.lower() for n in os.listdir(folder)})

    monkeypatch.setattr(os.path, "exists", folded_exists)
    assert interrupt.folds_case(str(tmp_path), os.listdir(tmp_path))  # a case-folding file system, simulated
    assert find_latest_state(str(tmp_path), "lora") == str(tmp_path / "Lora-step00000004-state")
    assert find_latest_state(str(tmp_path), "lora_v2") is None


def _toy_state_parts():
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return dict(network=net, optimizer=opt, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


def test_each_rank_gets_its_own_generators_back(tmp_path):
    """A state saved by 2 processes holds both ranks' generators and gives each rank its own; a rank the state has
    none for (saved by fewer processes) starts the stream of (seed, rank, step), not rank 0's."""
    from library.rng import rank_seed, rng_state
    from library.train_state import load_state, save_state

    torch.manual_seed(1)
    rank0 = rng_state()
    torch.manual_seed(2)
    rank1 = rng_state()
    save_state(str(tmp_path / "two"), **_toy_state_parts(), step=5, epoch=1, batches_done=5, seed=7,
               rng_states=[rank0, rank1])
    for rank, want in ((0, rank0), (1, rank1)):
        torch.manual_seed(99)
        assert load_state(str(tmp_path / "two"), **_toy_state_parts(), rank=rank)["rng_ranks"] == 2
        assert torch.equal(torch.get_rng_state(), want["torch"])

    save_state(str(tmp_path / "one"), **_toy_state_parts(), step=5, epoch=1, batches_done=5, seed=7,
               rng_states=[rank0])
    assert load_state(str(tmp_path / "one"), **_toy_state_parts(), rank=1)["rng_ranks"] == 1
    got = torch.get_rng_state()
    assert not torch.equal(got, rank0["torch"])
    torch.manual_seed(rank_seed(7, 1, 5))
    assert torch.equal(got, torch.get_rng_state())
    assert rank_seed(7, 1, 5) != rank_seed(7, 2, 5) != rank_seed(7, 1, 0) and rank_seed(7, 1) < 2**32


def _seed_all(seed):
    """Python's, NumPy's and torch's global generators seeded alike."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_rank_streams_cover_every_generator_and_follow_the_seed():
    """Ranks 1.. draw Python `random`, NumPy and torch from the stream of rank_seed(seed, rank, step), rank 0 keeps
    its own; and that stream changes with --seed (a hash without the seed gave every 2-GPU run the same rank-1
    noise whatever --seed said; a generator left out made all ranks draw the same numbers from it)."""
    import random

    import numpy as np

    from library.rng import rank_seed, seed_rank_stream

    def draws():
        return random.random(), float(np.random.random_sample()), float(torch.rand(()))

    _seed_all(3)
    want0 = draws()
    _seed_all(3)
    seed_rank_stream(7, 0, 5)
    assert draws() == want0  # rank 0: untouched
    _seed_all(3)
    seed_rank_stream(7, 1, 5)
    s = rank_seed(7, 1, 5)
    assert draws() == (random.Random(s).random(), float(np.random.RandomState(s).random_sample()),
                       float(torch.rand((), generator=torch.Generator().manual_seed(s))))
    seed_rank_stream(8, 1, 5)
    other_seed = draws()
    seed_rank_stream(7, 1, 5)
    assert all(a != b for a, b in zip(other_seed, draws()))


def test_a_saved_rng_state_loads_back_and_replays_every_generator(tmp_path):
    """rng_state() written as a training state writes it, read back with weights_only=True, replays the same Python,
    NumPy and torch numbers: a resumed run draws what the uninterrupted one drew."""
    import random

    import numpy as np

    from library.rng import rng_state, set_rng_state

    _seed_all(11)
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.random_sample(3).tolist(), torch.rand(3).tolist())
    _seed_all(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.random_sample(3).tolist(), torch.rand(3).tolist()) == want


def _stop_at(monkeypatch, step):
    """The trainer's stop check sees a SIGINT after the run's `step`-th optimizer step, as a Ctrl-C during it would;
    returns the call counter, which a test resets for the next run (a large `step` in it: never)."""
    import signal

    from library.interrupt import GracefulInterrupt

    calls = {"n": 0, "at": step}

    def requested(self, accelerator=None):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            self.signum = signal.SIGINT
        return self.signum is not None

    monkeypatch.setattr(GracefulInterrupt, "requested", requested)
    return calls


def test_a_run_interrupted_twice_and_resumed_ends_with_the_uninterrupted_lora(tiny_world, straight, tmp_path,
                                                                               monkeypatch):
    """Ctrl-C saves a state at the run's position (step, epoch and the epoch's batches done), and a resumed run
    counts the batches it skipped in its own saves: stopped after step 1, resumed and stopped after step 2, then
    resumed to the end, the LoRA is the uninterrupted run's, bit for bit. A state placed at the epoch's start (or a
    resumed run counting from 0) replays batches already trained on and quietly trains another LoRA."""
    seed = json.loads((straight / "lora-step00000002-state" / "train_state.json").read_text())["seed"]
    out = tmp_path / "out"
    calls = _stop_at(monkeypatch, 1)
    assert _run(tiny_world, out, "--seed", str(seed)) == 130  # 128 + SIGINT
    info = json.loads((out / "lora-step00000001-state" / "train_state.json").read_text())
    assert (info["step"], info["epoch"], info["batches_done"]) == (1, 1, 1)
    calls.update(n=0, at=1)
    assert _run(tiny_world, out, "--resume", "latest") == 130
    info = json.loads((out / "lora-step00000002-state" / "train_state.json").read_text())
    assert (info["step"], info["epoch"], info["batches_done"]) == (2, 1, 2)  # 1 batch skipped + 1 trained
    calls.update(n=0, at=10**9)
    assert _run(tiny_world, out, "--resume", "latest") == 0
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(out / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_during_the_last_step_ends_the_run_as_usual(tiny_world, tmp_path, monkeypatch):
    """Ctrl-C in the run's last step: nothing is left to resume (a resume there is refused), so the run writes its
    final LoRA and exits 0, rather than an interrupted step file and a state no run can continue from."""
    _stop_at(monkeypatch, 4)
    out = tmp_path / "out"
    assert _run(tiny_world, out, "--seed", "1") == 0
    assert sorted(os.listdir(out)) == ["lora.safetensors"]
