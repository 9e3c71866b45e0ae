"""Test setup: never touch the network, keep torch on few threads (CI has 2 cores); shared fixtures."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threading overhead dominates, and a shared 2-core CPU makes 2 threads far slower (OpenMP spinning); the one place tests set it


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


class SimpleWorld:
    """What `tiny_world` gives: `root`, `dataset` (the TOML's path) and `model(arch)`."""

    def __init__(self, root, model):
        self.root, self.dataset, self.model = root, str(root / "ds.toml"), model


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A folder with 3 random 64² images (`imgs/`), a dataset TOML of them (`ds.toml`: batch 1, class tokens
    "sks dog"), and `model(arch)`: a tiny diffusers model of `arch` written there on first use (`root / arch`)."""
    import numpy as np
    from PIL import Image

    from library.tiny_models import write_tiny_model

    root = tmp_path_factory.mktemp("world")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
    (root / "ds.toml").write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 1\n  [[datasets.subsets]]\n'
                                  f'  image_dir = "{(root / "imgs").as_posix()}"\n  class_tokens = "sks dog"\n')

    def model(arch="sd1"):
        if not (root / arch).exists():
            write_tiny_model(arch, str(root / arch))
        return str(root / arch)

    return SimpleWorld(root, model)


@pytest.fixture
def tb_scalars():
    """read(log_root) -> {tag: [(step, value)]}: the scalars a trainer run logged under --logging_dir (accelerate's
    tracker folder <time>/network_train; its hparams sit below)."""
    def read(log_root):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (run,) = log_root.glob("*/network_train")
        acc = EventAccumulator(str(run))
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    return read


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three random 72x80 RGB photos (the end-to-end trainer tests' dataset)."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return str(d)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny SD1 and SDXL models as diffusers folders, and SD1 as a single .safetensors file."""
    from library.tiny_models import write_tiny_model

    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ("sd1", "sdxl"):
        out[arch] = str(root / arch)
        write_tiny_model(arch, out[arch])
    out["sd1_single"] = str(root / "sd1.safetensors")
    write_tiny_model("sd1", out["sd1_single"], single_file=True)
    return out


@pytest.fixture
def windows_path_limit(monkeypatch):
    """This machine as Windows without long paths: mkstemp fails for a path over 259 characters, as CreateFileW."""
    import errno
    import tempfile

    from library import safe_io

    real_mkstemp, real_check = tempfile.mkstemp, safe_io._too_long_on_windows

    def mkstemp(suffix="", prefix="", dir=None):
        if len(os.path.join(os.path.abspath(dir), prefix + "x" * 8 + suffix)) > 259:
            raise FileNotFoundError(errno.ENOENT, "The system cannot find the path specified")
        return real_mkstemp(suffix=suffix, prefix=prefix, dir=dir)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(safe_io, "_too_long_on_windows", lambda path: real_check(path, windows=True))
