"""The bundled example configs stay valid: argument TOMLs parse, dataset TOMLs validate and find their images."""
import glob
import os

import pytest

from library.config_util import generate_blueprint, load_dataset_config
from library.train_args import setup_parser
from library.config_file import parse_args_with_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARG_FILES = ["examples/toyworld/train.toml", "examples/sd15_dog.toml", "examples/sdxl_backpack.toml"]


@pytest.mark.parametrize("path", ARG_FILES)
def test_argument_files_parse_and_their_datasets_resolve(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # example paths are relative to the repository root, as the README runs them
    args = parse_args_with_config(setup_parser(), ["--config_file", path])
    assert args.dataset_config and os.path.exists(args.dataset_config)
    blueprints = generate_blueprint(load_dataset_config(args.dataset_config), args, config_path=args.dataset_config,
                                    is_sdxl="sdxl" in path)
    for bp in blueprints:
        for sub in bp.subsets:
            assert sum(len(glob.glob(os.path.join(sub.image_dir, e))) for e in ("*.jpg", "*.png")) >= 5
            assert sub.class_tokens and sub.prior_class_tokens


def test_bundled_toyworld_subject_is_the_generators_reference_set(tmp_path):
    """examples/toyworld/sks_backpack holds exactly what the benchmark trains on (world.reference_set at 32 px)."""
    import numpy as np
    from PIL import Image

    from bench.toyworld import evaluate as E
    from bench.toyworld import world as W

    E.write_references(W.SubjectSpec(), 32, str(tmp_path))
    bundled = os.path.join(ROOT, "examples", "toyworld", "sks_backpack")
    assert sorted(os.listdir(bundled)) == sorted(os.listdir(tmp_path))
    for name in os.listdir(tmp_path):
        a, b = os.path.join(bundled, name), os.path.join(tmp_path, name)
        if name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        else:
            assert open(a).read() == open(b).read() == "a sks backpack\n"


def test_cli_reference_is_generated_from_the_parser():
    """docs/cli.md is `python -m library.train_args` output: a new or changed flag must be regenerated."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "library.train_args"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert open(os.path.join(ROOT, "docs", "cli.md"), encoding="utf-8").read() == out, \
        "docs/cli.md is stale: run python -m library.train_args > docs/cli.md"
