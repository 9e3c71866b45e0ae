"""sd-scripts' --initial_step / --initial_epoch / --skip_until_initial_step: a run without a saved state that goes
on from step N of a longer run (its step count, epoch numbering, learning rate and, with the skip, its batches),
and resuming in the folder of an interrupted run that saved per-epoch files."""
import argparse
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_apt_lora
from library.train_state import initial_position


@pytest.fixture
def world(tiny_world):
    """3 images, batch 1: 3 optimizer steps an epoch."""
    return {"model": tiny_world.model("sd1"), "dataset": tiny_world.dataset}


def _run(world, out, *extra):
    return train_apt_lora.main(["--pretrained_model_name_or_path", world["model"], "--dataset_config", world["dataset"],
                                "--output_dir", str(out), "--output_name", "lora", "--network_dim", "4",
                                "--network_alpha", "4", "--learning_rate", "1e-3", "--seed", "7",
                                "--lr_scheduler", "cosine", *extra])


@pytest.fixture
def seen(monkeypatch):
    """(image keys, learning rate) of every micro-batch the trainer trains on."""
    record = []
    real = train_apt_lora.micro_batch

    def spy(args, ctx, batch, optimizer, *rest, **kw):
        record.append((tuple(batch["image_keys"]), optimizer.param_groups[0]["lr"]))
        return real(args, ctx, batch, optimizer, *rest, **kw)

    monkeypatch.setattr(train_apt_lora, "micro_batch", spy)
    return record


def test_initial_step_goes_on_with_the_count_the_schedule_and_with_the_skip_the_batches(world, tmp_path, seen):
    assert _run(world, tmp_path / "straight", "--max_train_steps", "6", "--save_every_n_steps", "4") == 0
    straight = list(seen)
    assert len(straight) == 6 and len({lr for _, lr in straight}) == 6  # cosine: a new rate at each step
    part = str(tmp_path / "straight" / "lora-step00000004.safetensors")

    seen.clear()  # steps 5 and 6 of the same run: the same batches and learning rates
    assert _run(world, tmp_path / "skip", "--max_train_steps", "6", "--network_weights", part, "--initial_step", "4",
                "--skip_until_initial_step", "--save_every_n_steps", "5") == 0
    assert seen == straight[4:6]
    assert not (tmp_path / "skip" / "lora-step00000004.safetensors").exists()  # step 4 was not trained here
    with safe_open(str(tmp_path / "skip" / "lora-step00000005.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "5"
    with safe_open(str(tmp_path / "skip" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "6"

    seen.clear()  # without the skip: epoch 2 from its first batch (sd-scripts), at the rates of steps 5 and 6
    assert _run(world, tmp_path / "noskip", "--max_train_steps", "6", "--network_weights", part,
                "--initial_step", "4") == 0
    assert [k for k, _ in seen] == [k for k, _ in straight[3:5]]
    assert [lr for _, lr in seen] == [lr for _, lr in straight[4:6]]


def test_skip_until_initial_step_skips_whole_accumulated_steps():
    """With --gradient_accumulation_steps N an optimizer step is N micro-batches, so --skip_until_initial_step skips
    N batches per step done in the epoch (sd-scripts: initial_step *= gradient_accumulation_steps); skipping one
    batch per step would retrain batches the earlier run already saw and shift every later step's batches."""
    def args(**kw):
        base = dict(initial_step=None, initial_epoch=None, skip_until_initial_step=True, gradient_accumulation_steps=4)
        return argparse.Namespace(**{**base, **kw})

    # 5 optimizer steps an epoch (20 micro-batches): 7 steps done = epoch 1 (5) + 2 steps of epoch 2 = 8 batches
    assert initial_position(args(initial_step=7), 5) == (7, 2, 8)
    assert initial_position(args(initial_step=3, gradient_accumulation_steps=2), 5) == (3, 1, 6)
    assert initial_position(args(initial_step=7, skip_until_initial_step=False), 5) == (7, 2, 0)
    assert initial_position(args(initial_epoch=2), 5) == (5, 2, 0)  # an epoch's first step: nothing to skip


def test_initial_epoch_starts_at_that_epochs_first_step_and_numbers_the_epoch_saves(world, tmp_path, seen):
    assert _run(world, tmp_path / "straight", "--max_train_epochs", "3") == 0
    straight = list(seen)
    seen.clear()
    out = tmp_path / "epoch2"
    assert _run(world, out, "--max_train_epochs", "3", "--initial_epoch", "2", "--save_every_n_epochs", "1") == 0
    assert seen == straight[3:9]
    assert sorted(p for p in os.listdir(out) if p.endswith(".safetensors")) == ["lora-000002.safetensors",
                                                                                 "lora.safetensors"]


@pytest.mark.parametrize("extra, message", [
    (["--initial_step", "6"], "--initial_step/--initial_epoch start at step 6, and the run ends at step 6"),
    (["--initial_epoch", "3"], "--initial_step/--initial_epoch start at step 6, and the run ends at step 6"),
    (["--initial_epoch", "0"], "--initial_epoch must be at least 1 (1 is the first), got 0"),
    (["--initial_step", "-1"], "--initial_step must be at least 0, got -1"),
    (["--max_train_epochs", "1", "--initial_epoch", "2"], "--initial_step/--initial_epoch start at step 3, and the "
                                                          "run ends at step 3"),
])
def test_initial_step_errors(world, tmp_path, capsys, monkeypatch, extra, message):
    """Each an error before the model loads (a real SDXL checkpoint takes tens of seconds to load)."""
    from library import model_util

    monkeypatch.setattr(model_util, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "out").mkdir()
    assert _run(world, tmp_path / "out", "--max_train_steps", "6", *extra) == 2
    assert message in capsys.readouterr().err


def test_resume_wins_over_initial_step(world, tmp_path, seen, caplog):
    """An interrupted --initial_step run prints "the same command plus --resume STATE": that command continues at
    the state's step, --initial_step ignored with a warning (it was refused)."""
    assert _run(world, tmp_path / "straight", "--max_train_steps", "6", "--save_every_n_steps", "4") == 0
    straight = list(seen)
    command = ["--max_train_steps", "6", "--network_weights", str(tmp_path / "straight" / "lora-step00000004.safetensors"),
               "--initial_step", "4", "--skip_until_initial_step", "--save_every_n_steps", "5", "--save_state"]
    out = tmp_path / "part"
    assert _run(world, out, *command) == 0
    for name in ("lora.safetensors", "lora-state"):  # as if stopped after step 5
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    seen.clear()
    assert _run(world, out, *command, "--resume", str(out / "lora-step00000005-state")) == 0
    assert seen == straight[5:6]
    assert "--initial_step/--initial_epoch are ignored" in caplog.text


def test_resume_in_the_folder_of_a_run_with_epoch_saves(world, tmp_path, capsys):
    """The interrupted run's own epoch file is not "a file this run would overwrite" (it was refused before)."""
    out = tmp_path / "out"
    assert _run(world, out, "--max_train_epochs", "3", "--save_every_n_epochs", "1", "--save_state") == 0
    for name in ("lora.safetensors", "lora-state", "lora-000002.safetensors", "lora-000002-state"):  # stopped in epoch 2
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert _run(world, out, "--max_train_epochs", "3", "--save_every_n_epochs", "1", "--save_state",
                "--resume", str(out / "lora-000001-state")) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (out / "lora-000002.safetensors").exists() and (out / "lora.safetensors").exists()
    # a state at or past the run's end: refused (it trained one step more before)
    assert _run(world, out, "--max_train_epochs", "1", "--resume", str(out / "lora-000002-state"),
                "--output_name", "other") == 2
    assert f"--resume {out / 'lora-000002-state'} is at step 6, and the run ends at step 3" in capsys.readouterr().err


def test_resume_from_a_step_state_at_an_epoch_end(world, tmp_path, capsys):
    """A --save_every_n_steps state at an epoch's last step comes before that epoch's end. When the earlier run
    saved the epoch's LoRA, the resumed run goes on with the next epoch (it was refused: "output file exists");
    when it did not (killed between the two saves), the epoch's end is replayed. Either way the run ends with the
    straight run's LoRA."""
    out = tmp_path / "out"
    flags = ("--max_train_epochs", "3", "--save_every_n_epochs", "1", "--save_every_n_steps", "3", "--save_state")
    assert _run(world, out, *flags) == 0
    straight = load_file(str(out / "lora.safetensors"))
    for name in ("lora.safetensors", "lora-state", "lora-000002.safetensors", "lora-000002-state",
                 "lora-step00000006.safetensors", "lora-step00000006-state"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    capsys.readouterr()
    state = str(out / "lora-step00000003-state")  # epoch 1's last step (3 steps an epoch)
    assert _run(world, out, *flags, "--resume", state) == 0
    assert "step 3, epoch 2 (the earlier run saved epoch 1's end" in capsys.readouterr().out
    resumed = load_file(str(out / "lora.safetensors"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)

    (out / "lora-000001.safetensors").unlink()  # killed between the step save and the epoch save
    assert _run(world, out, *flags, "--resume", state, "--overwrite") == 0
    assert "resumed from" in capsys.readouterr().out
    assert (out / "lora-000001.safetensors").exists()
    resumed = load_file(str(out / "lora.safetensors"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)

