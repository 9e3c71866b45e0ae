"""Atomic file writes, the overwrite guard, and the hashes sd-scripts writes into LoRA metadata.

* `atomic_save_safetensors` / `atomic_write_bytes`: write to a temporary file in the destination folder, fsync it,
  then move it into place, so a crash or a full disk never leaves a truncated file under the final name. An existing
  file is refused unless `overwrite=True` (`FileExistsError` naming the path and the `--overwrite` flag).
* `safetensors_hashes`: `sshs_model_hash` / `sshs_legacy_hash` exactly as sd-scripts'
  `train_util.precalculate_safetensors_hashes` (KOHYA_COMPAT §2.2).
* `model_hashes`: `ss_sd_model_hash` (old A1111 hash) and `ss_new_sd_model_hash` (full sha256) of a base model file.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import time

import safetensors.torch

_BLOCK = 1024 * 1024


class SaveError(OSError):
    """A file or folder could not be written (a full disk, no permission): the trainer's one-line error."""


class PathTooLongError(SaveError):
    """A write failed on Windows for a path over MAX_PATH (long paths not enabled): what to do is not "free space"."""


WINDOWS_MAX_PATH = 259  # characters, without the terminating NUL of MAX_PATH (260)


def _too_long_on_windows(path: str, windows: bool = os.name == "nt") -> bool:
    path = os.path.abspath(path)
    return windows and len(path) > WINDOWS_MAX_PATH and not path.startswith("\\\\?\\")


def check_writable(path, overwrite: bool = False, flag_hint: str = "--overwrite") -> None:
    """Raise if `path` cannot be written: `FileExistsError` if it exists and `overwrite` is false (the message names
    the path and says to pass `flag_hint`), `IsADirectoryError` if it is a folder, `PermissionError` if its folder
    (or the nearest existing parent, when the folder will be created) is not writable."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; give a file path to write to")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite it. Pass {flag_hint} to replace it, "
            "or choose another output name/folder."
        )
    parent = nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: folder {parent} is not writable")


def nearest_existing(path: str) -> str:
    """`path` itself if it exists, else its nearest existing parent (where a folder would be created)."""
    path = os.path.abspath(os.fspath(path))
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def fsync_file(path: str) -> None:
    """Flush a written file to disk. Opened for writing: Windows' fsync (FlushFileBuffers) refuses a read-only
    handle ("Bad file descriptor"), which made every state save fail there."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (a rename into it), where the platform allows: Windows cannot open a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: str, path: str, overwrite: bool) -> None:
    """Move the finished temp file onto `path`. Without `overwrite`, a hard link makes the "does not exist yet" check
    and the rename one atomic step (a file created meanwhile is still refused); filesystems without hard links fall
    back to a check followed by `os.replace`."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        check_writable(path, overwrite=False)  # raises with the user-facing message
        raise
    except OSError:
        check_writable(path, overwrite=False)
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _atomic_write(path, overwrite: bool, write_fn) -> None:
    path = os.fspath(path)
    check_writable(path, overwrite)
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}.{os.getpid()}."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    except OSError as e:  # Windows without long paths: "the system cannot find the path specified"
        longest = os.path.join(folder, prefix + "xxxxxxxx.tmp")  # the temporary name mkstemp makes
        if _too_long_on_windows(longest):
            raise PathTooLongError(
                f"cannot write {path}: with its temporary name the path is {len(longest)} characters, over Windows' "
                f"limit of {WINDOWS_MAX_PATH} ({e.strerror or e}). Move the folder nearer the drive's root or choose a "
                f"shorter name, or enable long paths in Windows (LongPathsEnabled, Windows 10 1607 or later)") from None
        raise
    os.close(fd)
    try:
        write_fn(tmp)
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            _commit(tmp, path, overwrite)
        except PermissionError as e:  # Windows: the file is open in another program (a UI testing the LoRA)
            if not (overwrite and os.path.exists(path)):
                raise
            kept = _keep_beside(tmp, path)
            if kept == path:  # a retry went through (an antivirus scan let go)
                fsync_dir(folder)
                return
            raise SaveError(f"cannot replace {path}: it is in use by another program ({e.strerror or e}); the new "
                            f"file is kept as {kept}. Close the program that has it open (or rename that file "
                            f"over it)") from None
        fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


REPLACE_RETRIES = 10  # x 0.1 s: an antivirus scan holds a new file open for a moment


def _keep_beside(tmp: str, path: str) -> str:
    """After `os.replace(tmp, path)` failed with PermissionError: retry a while (a scan lets go); else move the
    finished file to `<path stem>-<YYYYmmdd-HHMMSS><ext>` and return that name (re-raises if that fails too)."""
    for _ in range(REPLACE_RETRIES):
        time.sleep(0.1)
        try:
            os.replace(tmp, path)
            return path
        except PermissionError:
            continue
    stem, ext = os.path.splitext(path)
    kept = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}{ext}"
    os.replace(tmp, kept)
    return kept


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes, overwrite: bool = False) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename). Creates the folder."""

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_write(path, overwrite, write)


def _str_metadata(metadata) -> dict:
    return {str(k): str(v) for k, v in (metadata or {}).items()}


def atomic_save_safetensors(tensors: dict, path, metadata: dict | None = None, overwrite: bool = False) -> None:
    """`safetensors.torch.save_file(tensors, path, metadata)` done atomically; metadata values are `str()`-ed
    (sd-scripts does the same, so None becomes "None"). Tensors are made contiguous and moved to CPU."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    md = _str_metadata(metadata)
    # serialise in memory and write our own pid-tagged temp file: safetensors' save_file makes a hidden temp file of
    # its own (".tmpXXXXXX") that a kill would leave behind with no way to tell whose it is
    data = safetensors.torch.save(tensors, metadata=md or None)
    atomic_write_bytes(path, data, overwrite=overwrite)


def _hash_after_header(b: io.BytesIO) -> str:
    h = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(8 + n)
    for chunk in iter(lambda: b.read(_BLOCK), b""):
        h.update(chunk)
    return h.hexdigest()


def _legacy_hash(b) -> str:
    h = hashlib.sha256()
    b.seek(0x100000)
    h.update(b.read(0x10000))
    return h.hexdigest()[0:8]


def safetensors_hashes(tensors: dict, metadata: dict | None) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts computes them before saving: keep only the `ss_*` metadata,
    serialise with `safetensors.torch.save`; model hash = sha256 of every byte after the header (the "addnet hash",
    independent of the metadata); legacy = first 8 hex of sha256(buf[0x100000:0x110000])."""
    md = {k: v for k, v in _str_metadata(metadata).items() if k.startswith("ss_")}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    b = io.BytesIO(safetensors.torch.save(tensors, md or None))
    return _hash_after_header(b), _legacy_hash(b)


def addnet_hash_file(path) -> str:
    """sha256 of a .safetensors file's bytes after its header (equals the file's `sshs_model_hash`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def model_hashes(path) -> tuple[str | None, str | None]:
    """(ss_sd_model_hash, ss_new_sd_model_hash) of a base-model file: the old A1111 hash (first 8 hex of sha256 of the
    64 KiB at offset 1 MiB) and the full-file sha256. (None, None) when `path` is not a file (a diffusers folder or a
    hub id): the caller then leaves both keys out, which sd-scripts' readers tolerate."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None, None
    full = hashlib.sha256()
    with open(path, "rb") as f:
        old = _legacy_hash(f)
        f.seek(0)
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            full.update(chunk)
    return old, full.hexdigest()


# Only names this code writes, so that a user's `notes.tmp-2023` or `lora.safetensors.old-20240101` is never taken
# for one: _atomic_write's temp files (of the LoRA files, PNGs and --output_config TOML; mkstemp's 8 characters),
# train_state's folders (`<name>-state.tmp-<pid>`, `.old-<pid>`) and the γ heatmap's temp file
_TEMP_FILE = re.compile(r"^\.(?P<name>.+\.(?:safetensors|png|toml))\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
_TEMP_DIR = re.compile(r"^(?P<name>.+-state)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")
_TEMP_HEATMAP = re.compile(r"^(?P<name>.+_gamma\.png)\.tmp-(?P<pid>\d+)$")


def _pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 4194304  # Linux's largest; macOS pids stay below 100000


def _alive(pid: int, windows: bool = os.name == "nt") -> bool:
    """Whether process `pid` runs. Never `os.kill(pid, 0)` on Windows: there signal 0 is CTRL_C_EVENT (it would
    interrupt a console's processes), and a pid outside the console raised WinError 87. Unsure means alive: the age
    rule of `remove_stale_temp_files` then decides."""
    if pid == os.getpid():
        return True
    if windows:
        import _winapi

        try:
            handle = _winapi.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        except OSError as e:
            return getattr(e, "winerror", None) != 87  # 87: no such process; 5 (access denied): it runs
        try:
            return _winapi.GetExitCodeProcess(handle) == 259  # STILL_ACTIVE
        finally:
            _winapi.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


STALE_AFTER_S = 600  # a temp file untouched this long is no save in progress (one takes seconds)


def _last_touched(path: str) -> float:
    """The newest mtime of `path` and, for a folder, of the files in it."""
    times = [os.path.getmtime(path)]
    if os.path.isdir(path):
        times += [os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path)]
    return max(times)


def remove_stale_temp_files(folder, min_age_s: float = STALE_AFTER_S) -> list[str]:
    """Clean up after a process killed in the middle of a save (SIGKILL, power loss): delete the temp files and
    folders of dead processes, and put back an old state folder that was moved aside but not yet replaced.
    Returns what was removed or restored. Temp names carry the writer's pid, so a live writer on this machine is
    never touched; one on another machine or container sharing the folder (whose pid means nothing here) is
    protected by the age: only what is untouched for `min_age_s` is deleted. Putting back an old state folder
    under its free name deletes nothing and is done at once."""
    import shutil

    from library.train_state import STATE_FILES

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    done = []
    pid_max = _pid_max()
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if os.path.isdir(path):  # a state folder: being written (tmp), or moved aside (old: complete, or being
            m = _TEMP_DIR.match(entry)  # deleted once the new one was in): holding nothing but a state's files
            if m and not all(f in STATE_FILES or f.startswith(".tmp") for f in os.listdir(path)):
                m = None  # (".tmp...": safetensors' own temp file of a file being written)
        else:
            m = _TEMP_FILE.match(entry) or _TEMP_HEATMAP.match(entry)
        try:  # a leftover that cannot be cleaned up (in use on Windows, a permission) costs a line, not the run
            if not m or int(m.group("pid")) > pid_max or _alive(int(m.group("pid"))):
                continue
            target = os.path.join(folder, m.group("name"))
            if m.groupdict().get("kind") == "old" and not os.path.exists(target) \
                    and os.path.isfile(os.path.join(path, "train_state.json")):
                os.replace(path, target)  # killed between "move old aside" and "rename new in": the old one is whole
                done.append(f"restored {target}")
                continue
            if time.time() - _last_touched(path) < min_age_s:
                continue
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            done.append(f"removed {path}")
        except OSError as e:
            done.append(f"could not clean up {path} ({e.strerror or e}); delete it by hand when nothing uses it")
    return done
