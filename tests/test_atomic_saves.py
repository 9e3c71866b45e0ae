"""SIGKILL at any moment of a save leaves the old complete file or the new one, never a truncated one."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
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

            remove_stale_temp_files(out, min_age_s=0)  # the kill was just now: no age to wait for
            assert sorted(os.listdir(out)) in (["lora-state", "lora.safetensors"], ["lora.safetensors"], []), os.listdir(out)
            if step is not None:
                seen_steps.add(step)
            p = subprocess.Popen([sys.executable, HELPER, out], stdout=subprocess.PIPE, text=True, env=env)
            assert p.stdout.readline().strip() == "ready"
    finally:
        p.kill()
        p.wait()
    assert kills == 12 and len(seen_steps) > 1  # saves really happened between kills


def test_cleanup_touches_only_its_own_temp_names(tmp_path):
    """What a killed save leaves (a dead pid's temp LoRA file, state folder being written, state moved aside,
    heatmap temp file) is removed or put back; a user's files that merely look alike (a date where the pid would
    be, or a name this code never writes) are left alone: they were deleted, or a folder renamed, before."""
    from library.safe_io import remove_stale_temp_files

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = p.pid
    ours = [f".lora.safetensors.{dead}.ab_cd12e.tmp", f"lora-step00000002_gamma.png.tmp-{dead}"]
    users = ["lora.safetensors.old-20240101", "notes.tmp-99999999", f"notes.txt.tmp-{dead}",
             f".draft.txt.{dead}.abcdefgh.tmp", f"backup.old-{dead}"]
    for name in ours + users:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f"my_dataset.old-{dead}" / "sub").mkdir(parents=True)  # a user's folder: not a state of ours
    (tmp_path / f"mine-state.old-{dead}").mkdir()  # named like one, but holding what no state holds
    (tmp_path / f"mine-state.old-{dead}" / "notes.txt").write_text("x")
    users.append(f"mine-state.old-{dead}")
    (tmp_path / f"lora-step00000004-state.tmp-{dead}").mkdir()  # a state being written when the kill came
    (tmp_path / f"lora-state.old-{dead}").mkdir()  # a complete state moved aside, the new one not in yet
    (tmp_path / f"lora-state.old-{dead}" / "train_state.json").write_text("{}")
    (tmp_path / f"notes-state.tmp-{dead}").mkdir()  # named like a state being written, holding what none holds
    (tmp_path / f"notes-state.tmp-{dead}" / "notes.txt").write_text("x")
    users.append(f"notes-state.tmp-{dead}")
    assert remove_stale_temp_files(tmp_path) == [f"restored {tmp_path / 'lora-state'}"]  # the rest is too fresh
    old = time.time() - 3600  # (a writer on another machine sharing the folder has a pid that means nothing here)
    for name in ours + [f"lora-step00000004-state.tmp-{dead}"]:
        os.utime(tmp_path / name, (old, old))
    done = remove_stale_temp_files(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(users + [f"my_dataset.old-{dead}", "lora-state"]), done
    assert (tmp_path / "lora-state" / "train_state.json").is_file() and len(done) == 3


# -- --save_last_n_*: the saves pushed out of the kept window are deleted, nothing else -----------------------------

def test_rotated_out_names_as_sd_scripts_computes_them():
    from types import SimpleNamespace

    from library.train_util import rotated_out

    def args(**kw):
        base = dict(output_name="lora", save_every_n_epochs=2, save_every_n_steps=10, save_last_n_epochs=None,
                    save_last_n_steps=None, save_last_n_epochs_state=None, save_last_n_steps_state=None,
                    save_state=True)
        return SimpleNamespace(**{**base, **kw})

    # epochs count saves: every 2 epochs, keep 2 -> the save at epoch 6 pushes out epoch 2
    assert rotated_out(args(save_last_n_epochs=2), epoch=6) == ("lora-000002.safetensors", "lora-000002-state")
    assert rotated_out(args(save_last_n_epochs=2), epoch=4) == (None, None)  # epoch 0 was never saved
    assert rotated_out(args(save_last_n_epochs=2, save_last_n_epochs_state=1), epoch=6) == \
        ("lora-000002.safetensors", "lora-000004-state")
    # steps are a distance: every 10, last 30 -> at step 50 the save of step 10 goes (sd-scripts' own example)
    assert rotated_out(args(save_last_n_steps=30), step=50) == ("lora-step00000010.safetensors",
                                                                "lora-step00000010-state")
    assert rotated_out(args(save_last_n_steps=30), step=40) == (None, None)
    assert rotated_out(args(save_last_n_steps=25), step=50) == ("lora-step00000020.safetensors",
                                                                "lora-step00000020-state")
    assert rotated_out(args(), step=50) == (None, None) and rotated_out(args(), epoch=6) == (None, None)
    assert rotated_out(args(output_name=None, save_last_n_steps=30), step=50)[0] == "at-step00000010.safetensors"
    # without --save_state this run writes no state: an earlier run's state folders are not its to delete
    assert rotated_out(args(save_last_n_epochs=2, save_state=False), epoch=6) == ("lora-000002.safetensors", None)
    assert rotated_out(args(save_last_n_steps=30, save_state=False), step=50) == ("lora-step00000010.safetensors", None)


def test_remove_old_save_deletes_only_what_is_ours(tmp_path):
    from library.train_util import remove_old_save

    for name in ("lora-000002.safetensors", "lora-000002_gamma.png", "lora-000004.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "lora-000002-state").mkdir()
    (tmp_path / "lora-000002-state" / "train_state.json").write_text("{}")
    (tmp_path / "lora-000004-state").mkdir()  # not a state folder of ours: kept
    removed = remove_old_save(str(tmp_path), "lora-000002.safetensors", "lora-000002-state")
    assert sorted(os.path.basename(p) for p in removed) == ["lora-000002-state", "lora-000002.safetensors",
                                                           "lora-000002_gamma.png"]
    assert remove_old_save(str(tmp_path), "lora-000004.safetensors", "lora-000004-state") == \
        [str(tmp_path / "lora-000004.safetensors")]
    assert sorted(os.listdir(tmp_path)) == ["lora-000004-state", "notes.txt"]
    assert remove_old_save(str(tmp_path), None, None) == []


def test_a_save_in_use_elsewhere_is_left_with_a_warning(tmp_path, monkeypatch, caplog):
    """--save_last_n_*: on Windows a LoRA open in another program cannot be deleted; the PermissionError stopped the
    run mid-training. It is left, with a warning, and the rest goes."""
    from library.train_util import remove_old_save

    for name in ("lora-000002.safetensors", "lora-000002_gamma.png"):
        (tmp_path / name).write_bytes(b"x")
    real_remove = os.remove

    def in_use(path):
        if str(path).endswith(".safetensors"):
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real_remove(path)

    monkeypatch.setattr(os, "remove", in_use)
    assert remove_old_save(str(tmp_path), "lora-000002.safetensors", None) == [str(tmp_path / "lora-000002_gamma.png")]
    assert os.listdir(tmp_path) == ["lora-000002.safetensors"]
    assert "could not remove " + str(tmp_path / "lora-000002.safetensors") + " (The process cannot access" in caplog.text


def test_trainer_keeps_the_last_saves_and_states(tiny_world, tmp_path, capsys):
    import train_apt_lora

    def run(out, *extra):
        return train_apt_lora.main(["--pretrained_model_name_or_path", tiny_world.model("sd1"), "--dataset_config",
                                    tiny_world.dataset, "--output_dir", str(out), "--output_name", "lora",
                                    "--network_dim", "2", "--max_train_steps", "8", "--seed", "1", *extra])

    out = tmp_path / "out"
    assert run(out, "--save_every_n_steps", "2", "--save_last_n_steps", "3", "--save_state",
               "--save_last_n_steps_state", "1") == 0
    # saves at 2, 4, 6 (8 is the final one): at 6 the LoRA of step 2 goes; the states of 2 and 4 went at 4 and 6
    assert sorted(os.listdir(out)) == sorted(["lora-state", "lora-step00000004.safetensors",
                                              "lora-step00000006.safetensors", "lora-step00000006-state",
                                              "lora.safetensors"])
    assert "removed " + str(out / "lora-step00000002.safetensors") in capsys.readouterr().out

    out = tmp_path / "end"
    assert run(out, "--save_every_n_steps", "4", "--save_state_on_train_end") == 0
    assert sorted(os.listdir(out)) == ["lora-state", "lora-step00000004.safetensors", "lora.safetensors"]

    for extra, message in ((["--save_last_n_epochs", "2"], "--save_last_n_epochs keeps the last of the saves that "
                                                           "--save_every_n_epochs makes"),
                           (["--save_every_n_steps", "2", "--save_last_n_steps_state", "1"],
                            "--save_last_n_steps_state keeps training states: add --save_state"),
                           (["--save_every_n_steps", "2", "--save_last_n_steps", "0"],
                            "--save_last_n_steps must be at least 1, got 0")):
        assert run(tmp_path / "bad", *extra) == 2
        assert message in capsys.readouterr().err


def test_a_full_disk_is_one_error_line_and_leaves_no_half_state(tmp_path, monkeypatch, capsys, tiny_world):
    """A save on a full disk was a raw traceback (torch.save's is a RuntimeError, "unexpected pos"), and a
    half-written state folder stayed behind. Now: one `error:` line saying what to do, no temp folder left."""
    import errno

    import torch

    import library.safe_io
    import train_apt_lora
    from library.safe_io import SaveError
    from library.train_state import save_state

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 392384 vs 392276")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SaveError, match="cannot write the training state .*s-state: .*unexpected pos"):
        save_state(str(tmp_path / "s-state"), network=net, optimizer=opt, lr_scheduler=sched, step=1, epoch=1,
                   batches_done=1, seed=0)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    def no_space(tensors, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(library.safe_io, "atomic_save_safetensors", no_space)
    rc = train_apt_lora.main(["--pretrained_model_name_or_path", tiny_world.model("sd1"), "--dataset_config",
                              tiny_world.dataset, "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "error: [Errno 28] No space left on device" in err and "saves are atomic" in err
    assert "Traceback" not in err and "--resume" not in err  # no state to resume from was saved


# -- Windows semantics, simulated: the tests run on Linux ------------------------------------------------------------

def test_a_state_saves_where_fsync_needs_write_access_and_folders_cannot_be_opened(tmp_path, monkeypatch):
    """On Windows fsync (FlushFileBuffers) refuses a handle opened read-only ("Bad file descriptor") and os.open
    cannot open a folder: every state save failed there (--save_state, the state of an interrupt)."""
    import errno
    import fcntl

    import torch

    from library.train_state import load_state, save_state

    real_open, real_fsync = os.open, os.fsync

    def win_open(path, flags, *a, **k):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *a, **k)

    def win_fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", win_open)
    monkeypatch.setattr(os, "fsync", win_fsync)
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    folder = save_state(str(tmp_path / "s-state"), network=net, optimizer=opt, lr_scheduler=sched, step=3, epoch=1,
                        batches_done=3, seed=0)
    monkeypatch.undo()
    assert load_state(folder, network=net, optimizer=opt, lr_scheduler=sched)["step"] == 3


def test_cleanup_on_windows_asks_the_process_table_not_a_signal(tmp_path, monkeypatch):
    """os.kill(pid, 0) on Windows sends CTRL_C_EVENT (signal 0) to a console, and for a pid outside it raised
    WinError 87: every later run in the folder of a killed save crashed at start. Windows asks OpenProcess; a
    leftover that cannot be removed (in use) is reported, not raised."""
    import types

    from library import safe_io

    calls = []

    def open_process(access, inherit, pid):
        calls.append(pid)
        if pid == 4711:
            e = OSError(22, "The parameter is incorrect")
            e.winerror = 87  # no such process
            raise e
        return pid

    fake = types.SimpleNamespace(OpenProcess=open_process, GetExitCodeProcess=lambda h: 259 if h == 4712 else 0,
                                 CloseHandle=lambda h: None)
    monkeypatch.setitem(sys.modules, "_winapi", fake)
    monkeypatch.setattr(os, "kill", lambda *a: pytest.fail("os.kill on Windows"))
    assert not safe_io._alive(4711, windows=True)  # gone
    assert safe_io._alive(4712, windows=True)  # still active
    assert not safe_io._alive(4713, windows=True)  # exited, handle still open somewhere
    old = time.time() - 3600
    for pid in (4711, 4712):
        p = tmp_path / f".lora.safetensors.{pid}.abcd1234.tmp"
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    monkeypatch.setattr(safe_io, "_alive", lambda pid: pid == 4712)  # as the Windows branch answered above
    real_unlink = os.unlink

    def locked(path):
        raise PermissionError(13, "The process cannot access the file because it is being used by another process")

    monkeypatch.setattr(os, "unlink", locked)
    done = safe_io.remove_stale_temp_files(tmp_path)
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert len(done) == 1 and done[0].startswith(f"could not clean up {tmp_path / '.lora.safetensors.4711.abcd1234.tmp'}")
    assert sorted(os.listdir(tmp_path)) == [".lora.safetensors.4711.abcd1234.tmp", ".lora.safetensors.4712.abcd1234.tmp"]


def test_overwriting_a_lora_another_program_holds_open_keeps_the_new_one(tmp_path, monkeypatch):
    """Windows refuses to replace a file that another program has open (ComfyUI testing the LoRA maps it): the
    finished LoRA was deleted with its temp file and a raw PermissionError raised. Now a few retries (an antivirus
    scan lets go), then the new file is kept under a time-stamped name that the error names."""
    import errno

    import torch
    from safetensors.torch import load_file

    from library import safe_io

    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"old")
    real_replace = os.replace
    tries = []

    def in_use(src, dst):
        if os.path.abspath(dst) == str(target):
            tries.append(dst)
            raise PermissionError(errno.EACCES, "Access is denied", dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", in_use)
    monkeypatch.setattr(safe_io, "REPLACE_RETRIES", 2)
    with pytest.raises(safe_io.SaveError, match=r"cannot replace .*lora.safetensors: it is in use by another program "
                                                r"\(Access is denied\); the new file is kept as .*lora-\d{8}-\d{6}"):
        safe_io.atomic_save_safetensors({"w": torch.ones(4)}, target, overwrite=True)
    assert len(tries) == 3 and target.read_bytes() == b"old"
    (kept,) = [p for p in tmp_path.iterdir() if p.name != "lora.safetensors"]
    assert torch.equal(load_file(str(kept))["w"], torch.ones(4))
    # held for a moment (a scan): a retry goes through, and the save is a save
    kept.unlink()
    tries.clear()
    monkeypatch.setattr(os, "replace", lambda src, dst: in_use(src, dst) if not tries else real_replace(src, dst))
    safe_io.atomic_save_safetensors({"w": torch.zeros(4)}, target, overwrite=True)
    assert len(tries) == 1 and torch.equal(load_file(str(target))["w"], torch.zeros(4))
    assert os.listdir(tmp_path) == ["lora.safetensors"]


def test_a_path_over_windows_max_path_is_named_with_what_to_do(tmp_path, monkeypatch, windows_path_limit):
    """Windows without long paths: a write whose temporary name passes 259 characters failed as "cannot find the
    path specified" (a deep dataset folder's latent cache). The error says the length, the limit and the way out."""
    from library import safe_io

    deep = tmp_path / ("d" * (250 - len(str(tmp_path))))
    safe_io.atomic_write_bytes(tmp_path / "short.txt", b"ok")  # short paths are untouched
    assert (tmp_path / "short.txt").read_bytes() == b"ok"
    with pytest.raises(safe_io.PathTooLongError) as e:
        safe_io.atomic_write_bytes(deep / "image.safetensors", b"x")
    n = len(str(deep / ".image.safetensors.")) + len(str(os.getpid())) + 1 + 12
    assert f"cannot write {deep / 'image.safetensors'}: with its temporary name the path is {n} characters" in str(e.value)
    assert "over Windows' limit of 259" in str(e.value) and "LongPathsEnabled" in str(e.value)
    assert isinstance(e.value, safe_io.SaveError)
    monkeypatch.undo()
    assert not safe_io._too_long_on_windows("x" * 300)  # not Windows: no limit of this kind


def test_a_file_created_while_saving_is_not_overwritten(tmp_path, monkeypatch):
    """Without --overwrite, a file that appears under the name while the save is being written (a second run with
    the same --output_name) is kept: the save fails with the --overwrite message instead of replacing it, and leaves
    no temp file."""
    from library import safe_io

    path = tmp_path / "lora.safetensors"
    real_fsync = safe_io.fsync_file

    def other_run_saves_meanwhile(tmp):
        real_fsync(tmp)
        path.write_bytes(b"the other run's LoRA")

    monkeypatch.setattr(safe_io, "fsync_file", other_run_saves_meanwhile)
    with pytest.raises(FileExistsError, match="already exists; refusing to overwrite it. Pass --overwrite"):
        safe_io.atomic_write_bytes(path, b"ours")
    assert path.read_bytes() == b"the other run's LoRA" and os.listdir(tmp_path) == ["lora.safetensors"]


def test_an_unwritable_folder_is_refused_before_writing(tmp_path, monkeypatch):
    """check_writable (run before a long conversion or training) refuses a folder the user cannot write in, naming
    it, also for a folder still to be created under it. (os.access is faked: root ignores permission bits.)"""
    from library import safe_io

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    for target in (tmp_path / "lora.safetensors", tmp_path / "new" / "lora.safetensors"):
        with pytest.raises(PermissionError, match=f"cannot write {target}: folder {tmp_path} is not writable"):
            safe_io.check_writable(target)


def test_stale_hashes_in_the_metadata_do_not_change_sshs_legacy_hash():
    """sshs_legacy_hash is hashed over a header of the ss_* keys only (sd-scripts' precalculate_safetensors_hashes):
    sshs_* values carried over from an earlier save, or modelspec keys, must not shift it."""
    import hashlib

    import safetensors.torch
    import torch

    from library import safe_io

    t = {"w": torch.arange(400_000, dtype=torch.float32)}
    ref = safetensors.torch.save(t, {"ss_a": "1"})
    got = safe_io.safetensors_hashes(t, {"ss_a": "1", "sshs_model_hash": "0" * 64, "modelspec.title": "t"})
    assert got[1] == hashlib.sha256(ref[0x100000:0x110000]).hexdigest()[:8]
    assert got[0] == hashlib.sha256(ref[8 + int.from_bytes(ref[:8], "little"):]).hexdigest()


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_a_saved_file_gets_the_usual_permissions_not_the_temp_files(tmp_path):
    """The temp file is made private (0600, mkstemp); the saved LoRA must get the permissions any new file gets under
    the umask (0644 under 022), or a UI running as another user (a shared server, a container) cannot read it."""
    import torch

    from library.safe_io import atomic_save_safetensors

    old = os.umask(0o022)
    try:
        atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "lora.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "lora.safetensors").stat().st_mode & 0o777 == 0o644


def test_trainer_saves_every_n_epochs_and_keeps_the_last_n(tiny_world, tmp_path):
    """--save_every_n_epochs 2 over 5 epochs saves at the ends of epochs 2 and 4 (not 5: the final save is the run's
    end), and --save_last_n_epochs 1 deletes epoch 2's LoRA and state when epoch 4's are written. Epoch 4's files
    say where they stand: 4 steps and 4 epochs done, and a resume starts epoch 5 at its first batch. (Batch 3 of the
    3 images: one step an epoch.)"""
    import json

    from safetensors import safe_open

    import train_apt_lora

    toml = tmp_path / "ds.toml"
    toml.write_text(open(tiny_world.dataset).read().replace("batch_size = 1", "batch_size = 3"))
    out = tmp_path / "out"
    assert train_apt_lora.main(["--pretrained_model_name_or_path", tiny_world.model("sd1"), "--dataset_config",
                                str(toml), "--output_dir", str(out), "--output_name", "lora", "--network_dim", "2",
                                "--max_train_epochs", "5", "--seed", "1", "--save_every_n_epochs", "2",
                                "--save_last_n_epochs", "1", "--save_state"]) == 0
    assert sorted(os.listdir(out)) == ["lora-000004-state", "lora-000004.safetensors", "lora-state",
                                       "lora.safetensors"]
    with safe_open(str(out / "lora-000004.safetensors"), "pt") as f:
        assert (f.metadata()["ss_steps"], f.metadata()["ss_epoch"]) == ("4", "4")
    info = json.loads((out / "lora-000004-state" / "train_state.json").read_text())
    assert (info["step"], info["epoch"], info["batches_done"]) == (4, 5, 0)
