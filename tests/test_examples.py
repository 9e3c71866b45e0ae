"""The bundled example configs stay valid: argument TOMLs parse, dataset TOMLs validate and find their images."""
import glob
import os

import pytest

from library.config_util import generate_blueprint, load_dataset_config
from library.train_args import setup_parser
from library.train_util import parse_args_with_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARG_FILES = ["examples/quickstart/train.toml", "examples/sd15_dog.toml", "examples/sdxl_backpack.toml"]


@pytest.mark.parametrize("path", ARG_FILES)
def test_argument_files_parse_and_their_datasets_resolve(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # example paths are relative to the repository root, as the README runs them
    args = parse_args_with_config(setup_parser(), ["--config_file", path])
    assert args.dataset_config and os.path.exists(args.dataset_config)
    blueprints = generate_blueprint(load_dataset_config(args.dataset_config), args, config_path=args.dataset_config,
                                    is_sdxl="sdxl" in path)
    for bp in blueprints:
        for sub in bp.subsets:
            assert len(glob.glob(os.path.join(sub.image_dir, "*.jpg"))) >= 5
            assert sub.class_tokens and sub.prior_class_tokens
