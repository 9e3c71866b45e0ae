"""Model loading: diffusers folders and single-file LDM/SGM checkpoints, flags, errors, saving.

Tiny random models (library.tiny_models) stand in for real ones; full-size layouts are checked on the meta device.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from library import ldm_convert, model_util
from library.model_util import ModelLoadError, arch_config, build_from_config, detect_arch, load_model, probe_model
from library.tiny_models import build_tiny_model, tiny_config

ARCHS = ["sd1", "sd2", "sdxl"]
DOG = [49406, 320, 1125, 539, 320, 1929, 49407]  # "a photo of a dog"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per arch: the in-memory original, its diffusers folder and single file, and both loaded back."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in ARCHS:
        orig = build_tiny_model(arch, seed=1)
        folder = model_util.save_diffusers(orig, root / arch)
        file = model_util.save_single_file(orig, root / f"{arch}.safetensors")
        out[arch] = dict(orig=orig, folder=folder, file=file,
                         from_folder=load_model(folder), from_file=load_model(file))
    return out


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _assert_same_outputs(orig, loaded):
    g = torch.Generator().manual_seed(0)
    ctx_dim = orig.unet.config.cross_attention_dim
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, ctx_dim, generator=g)
    kwargs = {}
    if orig.is_sdxl:
        pooled = orig.text_encoders[1].config.projection_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    # The weights are bitwise equal (_assert_same_weights); outputs may differ in the last bits, since CPU
    # kernels (SDPA, GEMM blocking) can pick another summation order for tensors at other addresses.
    close = dict(rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(orig.unet(x, 500, ctx, **kwargs).sample, loaded.unet(x, 500, ctx, **kwargs).sample, **close)
        torch.testing.assert_close(orig.vae.decode(x).sample, loaded.vae.decode(x).sample, **close)
        ids = torch.tensor([DOG + [49407] * 70])
        for a, b in zip(orig.text_encoders, loaded.text_encoders):
            torch.testing.assert_close(a(ids).last_hidden_state, b(ids).last_hidden_state, **close)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("form", ["from_folder", "from_file"])
def test_roundtrip_equals_original(tiny, arch, form):
    t = tiny[arch]
    orig, m = t["orig"], t[form]
    assert m.arch == arch and m.is_sdxl == (arch == "sdxl")
    assert m.source == (t["folder"] if form == "from_folder" else t["file"])
    assert not m.v_parameterization and m.noise_scheduler.config.prediction_type == "epsilon"
    assert len(m.text_encoders) == len(m.tokenizers) == (2 if arch == "sdxl" else 1)
    for a, b in [(orig.unet, m.unet), (orig.vae, m.vae), *zip(orig.text_encoders, m.text_encoders)]:
        _assert_same_weights(a, b)
        assert not b.training and all(p.dtype == torch.float32 and not p.requires_grad for p in b.parameters())
    _assert_same_outputs(orig, m)
    for tok, pad in zip(m.tokenizers, model_util.PAD_TOKENS[arch]):
        assert tok("a photo of a dog").input_ids == DOG
        assert tok.pad_token == pad and tok.model_max_length == 77
    assert m.configs["arch"] == arch and m.configs["unet"]["block_out_channels"] == list(orig.unet.config.block_out_channels)
    assert m.latent_scale == orig.latent_scale


def test_single_file_layout_is_what_diffusers_expects(tiny):
    """Key layout checks diffusers' single-file loader itself uses, and our header."""
    from diffusers.loaders import single_file_utils as sfu
    from safetensors import safe_open

    sds = {a: load_file(tiny[a]["file"]) for a in ARCHS}
    # diffusers' SD1 marker key (named "v1" from 0.33 on; 0.32 infers SD1 when no other marker matches)
    v1 = sfu.CHECKPOINT_KEY_NAMES.get("v1", "model.diffusion_model.output_blocks.11.0.skip_connection.weight")
    assert sfu.is_clip_model(sds["sd1"]) and v1 in sds["sd1"]
    assert sfu.is_open_clip_model(sds["sd2"]) and not sfu.is_clip_model(sds["sd2"])
    assert sfu.is_clip_sdxl_model(sds["sdxl"]) and sfu.is_open_clip_sdxl_model(sds["sdxl"])
    # SD2: one more (identity) OpenCLIP layer than the model keeps, as in real 24-layer files
    n = tiny["sd2"]["orig"].text_encoders[0].config.num_hidden_layers
    rb = "cond_stage_model.model.transformer.resblocks."
    assert f"{rb}{n}.attn.in_proj_weight" in sds["sd2"] and f"{rb}{n + 1}.ln_1.weight" not in sds["sd2"]
    assert not sds["sd2"][f"{rb}{n}.attn.out_proj.weight"].any() and not sds["sd2"][f"{rb}{n}.mlp.c_proj.weight"].any()
    assert sds["sd1"]["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv as in LDM files
    with safe_open(tiny["sdxl"]["file"], "pt") as f:
        meta = f.metadata()
    assert json.loads(meta[model_util.CONFIGS_KEY])["arch"] == "sdxl" and meta[model_util.PREDICTION_KEY] == "epsilon"


def test_sd2_file_without_extra_layer_and_without_header(tiny, tmp_path, monkeypatch):
    """Files with exactly the kept layer count load too; without the header the real config is used."""
    sd = load_file(tiny["sd2"]["file"])
    n = tiny["sd2"]["orig"].text_encoders[0].config.num_hidden_layers
    sd = {k: v for k, v in sd.items() if not k.startswith(f"cond_stage_model.model.transformer.resblocks.{n}.")}
    path = str(tmp_path / "sd2_23.safetensors")
    save_file(sd, path)  # no metadata
    monkeypatch.setattr(model_util, "arch_config", tiny_config)
    m = load_model(path, v2=True, v_parameterization=True)
    assert m.arch == "sd2" and m.v_parameterization and m.noise_scheduler.config.prediction_type == "v_prediction"
    _assert_same_weights(tiny["sd2"]["orig"].text_encoders[0], m.text_encoders[0])


def test_v_prediction_from_scheduler_config_and_flag(tiny, tmp_path):
    from library.tiny_models import write_tiny_model

    folder = write_tiny_model("sd1", tmp_path / "v", v_parameterization=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f)["prediction_type"] == "v_prediction"
    m = load_model(folder)
    assert m.v_parameterization and m.noise_scheduler.config.prediction_type == "v_prediction"
    assert not load_model(folder, v_parameterization=False).v_parameterization
    # an epsilon single file can be overridden to v
    m = load_model(tiny["sd1"]["file"], v_parameterization=True)
    assert m.v_parameterization and m.noise_scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("arch, kwargs, flag", [
    ("sd1", {"sdxl": True}, "--sdxl"),
    ("sd2", {"sdxl": True}, "--sdxl"),
    ("sd1", {"v2": True}, "--v2"),
    ("sdxl", {"v2": True}, "--v2"),
    ("sd2", {"v2": False}, "--v2"),
    ("sdxl", {"sdxl": False}, "--sdxl"),
])
@pytest.mark.parametrize("form", ["file", "folder"])
@pytest.mark.parametrize("loader", [load_model, probe_model])
def test_contradicting_flags(tiny, arch, kwargs, flag, form, loader):
    path = tiny[arch][form]
    with pytest.raises(ModelLoadError) as e:
        loader(path, **kwargs)
    msg = str(e.value)
    assert flag in msg and path in msg and model_util.ARCH_NAMES[arch] in msg


def test_probe_tells_what_load_would_load_without_reading_weights(tiny, tmp_path, monkeypatch):
    """probe_model reads headers and configs only: with every weight reader broken it still answers, and its
    answer is what load_model gives (arch and v-prediction, from the file, the folder or the flag)."""
    from library.tiny_models import write_tiny_model

    v_folder = write_tiny_model("sd1", tmp_path / "v", v_parameterization=True)
    cases = [(tiny[a][form], {}) for a in ARCHS for form in ("file", "folder")]
    cases += [(v_folder, {}), (v_folder, {"v_parameterization": False}), (tiny["sd1"]["file"], {"v_parameterization": True})]
    expected = [(m.arch, m.v_parameterization) for m in (load_model(p, **kw) for p, kw in cases)]
    assert expected[:6] == [(a, False) for a in ARCHS for _ in range(2)] and expected[6:] == [("sd1", True), ("sd1", False), ("sd1", True)]

    def no_reading(*a, **k):
        raise AssertionError("weights were read")

    import safetensors.torch
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    monkeypatch.setattr(safetensors.torch, "load_file", no_reading)
    monkeypatch.setattr(ModelMixin, "from_pretrained", no_reading)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", no_reading)
    assert [probe_model(p, **kw) for p, kw in cases] == expected


def test_pickle_refused_unless_allowed(tiny, tmp_path, monkeypatch):
    sd = load_file(tiny["sd1"]["file"])
    path = str(tmp_path / "model.ckpt")
    torch.save({"global_step": 1, "state_dict": sd}, path)
    for loader in (load_model, probe_model):
        with pytest.raises(ModelLoadError) as e:
            loader(path)
        assert path in str(e.value) and "--allow_pickle_checkpoint" in str(e.value) and "safetensors" in str(e.value)
    assert probe_model(path, allow_pickle=True) == ("sd1", False)
    monkeypatch.setattr(model_util, "arch_config", tiny_config)  # no header in a pickle: tiny sizes via the config
    m = load_model(path, allow_pickle=True)
    assert m.arch == "sd1"
    _assert_same_weights(tiny["sd1"]["orig"].unet, m.unet)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_model(str(bad), allow_pickle=True)


def _fake(keys_shapes):
    return {k: torch.zeros(s) for k, s in keys_shapes.items()}


@pytest.mark.parametrize("sd, words", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32),
      "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": ()}, ["LoRA"]),
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
      "conditioner.embedders.0.model.text_projection": (8, 8)}, ["refiner"]),
    ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (8,)}, ["SD3"]),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (8,)}, ["Flux"]),
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3),
      "cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,)}, ["inpainting"]),
    ({"foo": (2,), "bar.weight": (3, 3)}, ["no Stable Diffusion UNet", "bar.weight"]),
])
def test_unknown_layouts(tmp_path, sd, words):
    path = str(tmp_path / "x.safetensors")
    save_file(_fake(sd), path)
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    msg = str(e.value)
    assert path in msg and "Supported:" in msg
    for w in words:
        assert w in msg


def test_detect_arch_from_keys_and_shapes():
    u = "model.diffusion_model."
    base = {u + "input_blocks.0.0.weight": (320, 4, 3, 3)}
    assert detect_arch({**base, "cond_stage_model.transformer.text_model.x": (1,)}) == "sd1"
    assert detect_arch({**base, "cond_stage_model.model.token_embedding.weight": (1,)}) == "sd2"
    assert detect_arch({**base, "conditioner.embedders.1.model.ln_final.weight": (1,)}) == "sdxl"
    # no text encoder: UNet context size decides
    for dim, arch in [(768, "sd1"), (1024, "sd2"), (2048, "sdxl")]:
        k = u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
        assert detect_arch({**base, k: (640, dim)}) == arch
    with pytest.raises(ModelLoadError, match="9 input channels"):
        detect_arch({u + "input_blocks.0.0.weight": (320, 9, 3, 3), "cond_stage_model.transformer.x": (1,)})


def test_missing_corrupt_and_wrong_paths(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ModelLoadError) as e:
        load_model(missing)
    assert missing in str(e.value) and "offline" in str(e.value)
    with pytest.raises(ModelLoadError, match="not found: runwayml/stable-diffusion-v1-5"):
        load_model("runwayml/stable-diffusion-v1-5")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(corrupt))
    assert str(corrupt) in str(e.value) and "corrupt" in str(e.value)
    txt = tmp_path / "model.txt"
    txt.write_text("x")
    with pytest.raises(ModelLoadError, match="unsupported model file type"):
        load_model(str(txt))
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_model(str(tmp_path))
    unet = tmp_path / "refiner" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps({"in_channels": 4, "addition_embed_type": "text_time"}))
    (tmp_path / "refiner" / "text_encoder_2").mkdir()
    with pytest.raises(ModelLoadError, match="refiner"):
        load_model(str(tmp_path / "refiner"))
    (unet / "config.json").write_text(json.dumps({"in_channels": 9}))
    with pytest.raises(ModelLoadError, match="inpainting"):
        load_model(str(tmp_path / "refiner"))
    with pytest.raises(ModelLoadError, match="--tokenizer_path"):
        load_model(str(corrupt), tokenizer_path=str(tmp_path / "no_such_dir"))
    for path, words in [(missing, "offline"), (str(corrupt), "corrupt"), (str(txt), "unsupported model file type"),
                        (str(tmp_path), "not a diffusers model folder"), (str(tmp_path / "refiner"), "inpainting")]:
        with pytest.raises(ModelLoadError, match=words):  # the cheap probe refuses what the load refuses
            probe_model(path)


def test_truncated_checkpoint_names_the_part(tiny, tmp_path):
    full = load_file(tiny["sd1"]["file"])
    sd = {k: v for k, v in full.items() if "output_blocks.3." not in k}
    path = str(tmp_path / "cut.safetensors")
    save_file(sd, path, metadata={model_util.CONFIGS_KEY: json.dumps(tiny_config("sd1"))})
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    assert path in str(e.value) and "UNet" in str(e.value) and "missing" in str(e.value)
    no_vae = {k: v for k, v in full.items() if not k.startswith("first_stage_model.")}
    save_file(no_vae, path, metadata={model_util.CONFIGS_KEY: json.dumps(tiny_config("sd1"))})
    with pytest.raises(ModelLoadError, match="--vae"):
        load_model(path)


def test_vae_path_single_file_and_folder(tiny, tmp_path):
    other = build_tiny_model("sd1", seed=7)
    vae_cfg = tiny_config("sd1")["vae"]
    ldm = ldm_convert.vae_to_ldm(other.vae.state_dict(), vae_cfg)
    with_prefix, bare = str(tmp_path / "vae_a.safetensors"), str(tmp_path / "vae_b.safetensors")
    save_file({k: v.contiguous() for k, v in ldm.items()}, with_prefix)
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in ldm.items()}, bare)
    m = load_model(tiny["sd1"]["file"], vae_path=with_prefix)
    _assert_same_weights(other.vae, m.vae)
    _assert_same_weights(tiny["sd1"]["orig"].unet, m.unet)
    _assert_same_weights(other.vae, model_util.load_vae(bare, vae_cfg))
    folder = tmp_path / "vae_folder"
    other.vae.save_pretrained(folder)
    _assert_same_weights(other.vae, load_model(tiny["sd1"]["folder"], vae_path=str(folder)).vae)
    _assert_same_weights(tiny["sd1"]["orig"].vae, model_util.load_vae(tiny["sd1"]["folder"], vae_cfg))  # <model>/vae
    with pytest.raises(ModelLoadError, match="VAE not found"):
        load_model(tiny["sd1"]["file"], vae_path=str(tmp_path / "missing_vae.safetensors"))


def test_tokenizer_path(tiny):
    tok_dir = os.path.join(tiny["sdxl"]["folder"], "tokenizer")
    m = load_model(tiny["sd1"]["file"], tokenizer_path=tok_dir)
    assert m.tokenizers[0]("a photo of a dog").input_ids == DOG
    # a folder holding tokenizer/ and tokenizer_2/; a flat folder gets each slot's pad token
    toks = model_util._load_tokenizers("sdxl", None, tiny["sdxl"]["folder"])
    assert [t.pad_token for t in toks] == ["<|endoftext|>", "!"]
    assert [t.pad_token for t in model_util._load_tokenizers("sdxl", None, tok_dir)] == ["<|endoftext|>", "!"]
    assert model_util._load_tokenizers("sd2", None, tok_dir)[0].pad_token == "!"
    # the saved folders also carry vocab.json + merges.txt for slow-tokenizer readers
    assert os.path.isfile(os.path.join(tok_dir, "vocab.json")) and os.path.isfile(os.path.join(tok_dir, "merges.txt"))


def test_save_refuses_overwrite_and_is_atomic(tiny, tmp_path):
    orig = tiny["sd1"]["orig"]
    path = str(tmp_path / "m.safetensors")
    model_util.save_single_file(orig, path)
    with pytest.raises(FileExistsError, match="overwrite"):
        model_util.save_single_file(orig, path)
    model_util.save_single_file(orig, path, dtype=torch.float16, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temp files left behind
    m = load_model(path)
    assert m.unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(m.unet.conv_in.weight, orig.unet.conv_in.weight.half().float())
    with pytest.raises(FileExistsError):
        model_util.save_diffusers(orig, tiny["sd1"]["folder"])
    model_util.save_diffusers(orig, tmp_path / "f")
    model_util.save_diffusers(orig, tmp_path / "f", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["f", "m.safetensors"]


def test_weights_format_policy(tmp_path):
    """Diffusers folders: safetensors preferred, fp16 variants found, .bin pickles only when allowed."""
    d = tmp_path / "c"
    d.mkdir()
    (d / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="--allow_pickle_checkpoint"):
        model_util._weights_kwargs(str(d), allow_pickle=False)
    assert model_util._weights_kwargs(str(d), allow_pickle=True) == {"use_safetensors": False, "variant": None}
    (d / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    assert model_util._weights_kwargs(str(d), allow_pickle=False) == {"use_safetensors": True, "variant": "fp16"}
    # a sharded index names its shards, which the libraries load whatever their kind: a .bin shard is a pickle
    sharded = tmp_path / "s"
    sharded.mkdir()
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"a.weight": "diffusion_pytorch_model-00001-of-00001.bin"}}')
    with pytest.raises(ModelLoadError, match=r"index.json names shard files that are not safetensors .*"
                                             r"--allow_pickle_checkpoint"):
        model_util._weights_kwargs(str(sharded), allow_pickle=False)
    assert model_util._weights_kwargs(str(sharded), allow_pickle=True)["use_safetensors"]
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"a.weight": "diffusion_pytorch_model-00001-of-00001.safetensors"}}')
    assert model_util._weights_kwargs(str(sharded), allow_pickle=False)["use_safetensors"]
    # the fp16 variant's index (model.safetensors.index.fp16.json, as diffusers and transformers name it) likewise
    os.remove(sharded / "diffusion_pytorch_model.safetensors.index.json")
    (sharded / "model.safetensors.index.fp16.json").write_text('{"weight_map": {"a.weight": "model.fp16-1-of-1.bin"}}')
    with pytest.raises(ModelLoadError, match=r"index.fp16.json names shard files that are not safetensors "
                                             r"\(model.fp16-1-of-1.bin\).*--allow_pickle_checkpoint"):
        model_util._weights_kwargs(str(sharded), allow_pickle=False)
    assert model_util._weights_kwargs(str(sharded), allow_pickle=True) == {"use_safetensors": True, "variant": "fp16"}


@pytest.mark.parametrize("version,expected", [("4.48.0", "torch_dtype"), ("4.55.4", "torch_dtype"),
                                              ("4.56.0", "dtype"), ("5.0.0rc1", "dtype"), ("5.25.0", "dtype")])
def test_dtype_keyword_follows_the_transformers_version(monkeypatch, version, expected):
    """transformers before 4.56 has no `dtype` keyword (passing it failed the load: found by a run at the
    requirements' lowest versions); later ones warn on `torch_dtype`. Diffusers models always take torch_dtype."""
    import transformers
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    monkeypatch.setattr(transformers, "__version__", version)
    assert model_util._dtype_keyword(CLIPTextModel) == expected
    assert model_util._dtype_keyword(UNet2DConditionModel) == "torch_dtype"


def test_diffusers_pipeline_reads_saved_folder(tiny):
    """A real consumer: diffusers' own pipeline loads the saved SD1 folder offline and runs."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd1"]["folder"], local_files_only=True)
    _assert_same_weights(tiny["sd1"]["orig"].unet, pipe.unet)
    assert pipe.tokenizer("a photo of a dog").input_ids == DOG
    out = pipe("a photo of a dog", num_inference_steps=1, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("arch, n_params, model_type", [
    ("sd1", 859_520_964, "v1"), ("sd2", 865_910_724, "v2"), ("sdxl", 2_567_463_684, "xl_base")])
def test_full_size_configs_on_meta(arch, n_params, model_type):
    """Real configs: parameter counts, and the full-size LDM/SGM layout round-trips through diffusers' converters
    (which also recognise the model type from our keys)."""
    from diffusers.loaders import single_file_utils as sfu

    cfg = arch_config(arch)
    with torch.device("meta"):
        m = build_from_config(cfg, [])
    assert sum(p.numel() for p in m.unet.parameters()) == n_params
    ldm = ldm_convert.to_ldm(arch, m.unet.state_dict(), m.vae.state_dict(),
                             [te.state_dict() for te in m.text_encoders], cfg)
    assert sfu.infer_diffusers_model_type(ldm) == model_type
    if arch == "sd2":  # real files: 24 OpenCLIP layers, the model keeps 23
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in ldm
        assert m.text_encoders[0].config.num_hidden_layers == 23
    assert detect_arch({k: v.shape for k, v in ldm.items()}) == arch
    checks = [(m.unet, ldm_convert.unet_to_diffusers(ldm, cfg["unet"])),
              (m.vae, ldm_convert.vae_to_diffusers(ldm, cfg["vae"]))]
    for (prefix, kind), te in zip(ldm_convert.TE_PREFIXES[arch], m.text_encoders):
        checks.append((te, ldm_convert.text_encoder_to_diffusers(ldm, prefix, kind, te)))
    for module, converted in checks:
        expected = module.state_dict()
        assert converted.keys() == expected.keys()
        assert all(converted[k].shape == expected[k].shape for k in expected)


def test_agreeing_flags_load(tiny):
    assert load_model(tiny["sdxl"]["file"], sdxl=True, v2=False).arch == "sdxl"
    assert load_model(tiny["sd1"]["file"], v2=False, sdxl=False).arch == "sd1"


def test_prediction_and_schedule_markers_of_other_tools(tiny, tmp_path, caplog):
    """ComfyUI's markers in a single file: an empty `v_pred` tensor or `modelspec.predict_key: v` mean v-prediction
    (NoobAI-style SDXL files; they trained as epsilon before, silently); `ztsnr` warns to pass --zero_terminal_snr;
    an EDM model (Playground v2.5's edm_mean, CosXL's edm_vpred.sigma_max) is refused. A v-prediction model saved here
    carries `v_pred` for ComfyUI; a saved diffusers folder has steps_offset 1 (from_config dropped it)."""
    from safetensors import safe_open

    sd = load_file(tiny["sdxl"]["file"])
    with safe_open(tiny["sdxl"]["file"], "pt") as f:  # its configs (tiny sizes), less our prediction key
        header = {k: v for k, v in f.metadata().items() if k != model_util.PREDICTION_KEY}

    def write(name, extra=None, metadata=None):
        path = str(tmp_path / f"{name}.safetensors")
        save_file({**sd, **(extra or {})}, path, metadata={**header, **(metadata or {})})
        return path

    assert probe_model(write("plain")) == ("sdxl", False)
    assert probe_model(write("vpred", {"v_pred": torch.tensor([])})) == ("sdxl", True)
    assert load_model(write("vpred", {"v_pred": torch.tensor([])})).v_parameterization
    assert probe_model(write("predict_key", metadata={"modelspec.predict_key": "v"})) == ("sdxl", True)
    # the first key that says decides (ours first): a stale "v" behind an explicit epsilon does not
    assert probe_model(write("both", metadata={"modelspec.prediction_type": "epsilon",
                                               "modelspec.predict_key": "v"})) == ("sdxl", False)
    ztsnr = write("ztsnr", {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    with caplog.at_level("WARNING"):
        assert probe_model(ztsnr, zero_terminal_snr=True) == ("sdxl", True)
        assert "--zero_terminal_snr" not in caplog.text
        probe_model(ztsnr)
    assert "marked as trained with zero terminal SNR (its ztsnr key): pass --zero_terminal_snr" in caplog.text
    for key in ("edm_mean", "edm_vpred.sigma_max"):
        path = write(key, {key: torch.zeros(1)})
        with pytest.raises(ModelLoadError, match=f"is an EDM model \\({key} key"):
            probe_model(path)

    # SD2 files do not say: the warning tells what ComfyUI's test (the spread of one norm bias) makes of the weights
    sd2 = load_file(tiny["sd2"]["file"])
    with safe_open(tiny["sd2"]["file"], "pt") as f:
        sd2_header = {k: v for k, v in f.metadata().items() if k != model_util.PREDICTION_KEY}
    for spread, says in ((0.2, "look like a 768-v model's"), (0.01, "look like an epsilon model's")):
        bias = torch.randn(8, generator=torch.Generator().manual_seed(0))
        path = str(tmp_path / f"sd2-{spread}.safetensors")
        save_file({**sd2, model_util._SD2_V_KEY: bias / bias.std(unbiased=False) * spread}, path, metadata=sd2_header)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert probe_model(path) == ("sd2", False)  # a guess only: the flag decides
        assert "SD2 single files do not say" in caplog.text and says in caplog.text, caplog.text

    v_model = build_tiny_model("sd1", seed=1)
    v_model.v_parameterization = True
    saved = model_util.save_single_file(v_model, tmp_path / "v.safetensors")
    with safe_open(saved, "pt") as f:
        assert "v_pred" in f.keys()
    assert load_model(saved).v_parameterization
    with open(os.path.join(tiny["sd1"]["folder"], "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
        assert json.load(f)["steps_offset"] == 1


def test_assign_reshapes_1x1_convs_but_refuses_a_transposed_tensor():
    """A 1x1 conv's [o, i, 1, 1] fits a Linear's [o, i]; a transposed [i, o] of the same size is an error (it was
    reshaped silently, scrambling the weight)."""
    conv = torch.arange(6.0).reshape(2, 3, 1, 1)
    loaded = model_util._assign(torch.nn.Linear(3, 2), {"weight": conv, "bias": torch.zeros(2)}, "UNet", "f")
    assert torch.equal(loaded.weight, conv.reshape(2, 3))
    with pytest.raises(ModelLoadError, match=r"1 of another shape \(e.g. \['weight: file \(3, 2\) vs model \(2, 3\)"):
        model_util._assign(torch.nn.Linear(3, 2), {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}, "UNet", "f")


def _copy_folder(tiny, arch, tmp_path, name):
    import shutil

    return shutil.copytree(tiny[arch]["folder"], tmp_path / name)


def _edit_json(path, **changes):
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_folders_of_other_kinds_are_refused_by_name(tiny, tmp_path, caplog):
    """An EDM folder (Playground v2.5: an EDM scheduler, a VAE with latents_mean) trained silently as DDPM epsilon,
    where the same model as a single file is refused; a Flux/SD3 folder was "not a diffusers model folder"; a
    prediction type other than epsilon/v was trained as epsilon; a config that is JSON but not an object was an
    AttributeError."""
    edm = _copy_folder(tiny, "sdxl", tmp_path, "edm")
    _edit_json(edm / "scheduler" / "scheduler_config.json", _class_name="EDMDPMSolverMultistepScheduler",
               sigma_data=0.5)
    for loader in (load_model, probe_model):
        with pytest.raises(ModelLoadError, match=r"is an EDM model \(scheduler EDMDPMSolverMultistepScheduler"):
            loader(str(edm))
    latents = _copy_folder(tiny, "sdxl", tmp_path, "latents_mean")
    _edit_json(latents / "vae" / "config.json", latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    with pytest.raises(ModelLoadError, match=r"is an EDM model \(latents_mean in vae/config.json"):
        probe_model(str(latents))
    flux = tmp_path / "flux"
    (flux / "transformer").mkdir(parents=True)
    (flux / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelLoadError, match="It is a FluxPipeline model folder, not an SD1.x/SD2.x/SDXL one"):
        probe_model(str(flux))
    sample = _copy_folder(tiny, "sd1", tmp_path, "sample")
    _edit_json(sample / "scheduler" / "scheduler_config.json", prediction_type="sample")
    with pytest.raises(ModelLoadError, match="prediction_type 'sample' is not supported"):
        probe_model(str(sample))
    _edit_json(sample / "scheduler" / "scheduler_config.json", prediction_type="epsilon")
    (sample / "unet" / "config.json").write_text("[]")
    with pytest.raises(ModelLoadError, match=r"unet/config.json: a JSON object is expected, not list"):
        probe_model(str(sample))


def test_a_folders_prediction_type_is_said_when_in_doubt(tiny, tmp_path, caplog):
    """--v_parameterization against a scheduler that says epsilon, an SD2 folder without a scheduler config, and a
    zero-terminal-SNR scheduler were taken without a word (single files warn)."""
    import shutil

    eps = _copy_folder(tiny, "sd2", tmp_path, "eps")
    assert probe_model(str(eps), v_parameterization=True) == ("sd2", True)
    assert load_model(str(eps), v_parameterization=True).v_parameterization  # as the trainer: probe, then load
    assert caplog.text.count("says prediction_type epsilon; training as v-prediction as asked") == 1
    caplog.clear()
    shutil.rmtree(eps / "scheduler")
    assert probe_model(str(eps)) == ("sd2", False)
    assert "no scheduler/scheduler_config.json to say whether it is a v-prediction (768-v)" in caplog.text
    caplog.clear()
    ztsnr = _copy_folder(tiny, "sd1", tmp_path, "ztsnr")
    _edit_json(ztsnr / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=True)
    probe_model(str(ztsnr))
    assert "rescale_betas_zero_snr" in caplog.text and "--zero_terminal_snr" in caplog.text
    caplog.clear()
    probe_model(str(ztsnr), zero_terminal_snr=True)
    assert caplog.text == ""


def test_sharded_variant_folders_load_and_the_variant_is_chosen_by_name(tiny, tmp_path):
    """save_pretrained(variant="fp16") with shards writes model.fp16-00001-of-00002.safetensors and
    model.safetensors.index.fp16.json: "holds no model weights" before. With two variants and no plain file the
    pick followed the directory's order."""
    import shutil

    folder = _copy_folder(tiny, "sd1", tmp_path, "sharded")
    orig = tiny["sd1"]["orig"]
    for sub, module in (("unet", orig.unet), ("text_encoder", orig.text_encoders[0])):
        shutil.rmtree(folder / sub)
        module.save_pretrained(folder / sub, variant="fp16", max_shard_size="20KB")
        names = os.listdir(folder / sub)
        assert any("-00002-of-" in n for n in names) and not any(n.endswith(".safetensors") and "fp16" not in n
                                                                  for n in names)
    m = load_model(str(folder))
    _assert_same_weights(orig.unet, m.unet)
    _assert_same_weights(orig.text_encoders[0], m.text_encoders[0])
    d = tmp_path / "variants"
    d.mkdir()
    for name in ("model.non_ema.safetensors", "model.ema.safetensors"):
        (d / name).write_bytes(b"")
    assert model_util._weights_kwargs(str(d), allow_pickle=False)["variant"] == "ema"
    (d / "model.fp16.safetensors").write_bytes(b"")
    assert model_util._weights_kwargs(str(d), allow_pickle=False)["variant"] == "fp16"
    with pytest.raises(ModelLoadError, match=r"holds no model weights .*; it holds: notes.txt"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("")
        model_util._weights_kwargs(str(tmp_path / "empty"), allow_pickle=False)


def test_a_replacement_vae_must_fit_and_keeps_the_models_latent_scale(tiny, tmp_path, caplog):
    """--vae: a 16-channel VAE folder (Flux/SD3) loaded and the first step died in a conv; an SDXL VAE folder on an
    SD1 model brought its own scaling_factor (0.13025), where the same VAE as a file kept the model's; a folder
    that is not a VAE gave an obscure message. An SDXL folder whose VAE config has no scaling_factor got
    diffusers' default 0.18215."""
    from diffusers import AutoencoderKL

    cfg = {k: v for k, v in tiny_config("sd1")["vae"].items() if not k.startswith("_")}
    wide = tmp_path / "vae16"
    AutoencoderKL.from_config({**cfg, "latent_channels": 16}).save_pretrained(wide)
    with pytest.raises(ModelLoadError, match=r"--vae .*vae16: its latents have 16 channels and this sd1 UNet takes 4"):
        load_model(tiny["sd1"]["folder"], vae_path=str(wide))
    other = tmp_path / "vae_other_scale"
    AutoencoderKL.from_config({**cfg, "scaling_factor": 0.13025}).save_pretrained(other)
    m = load_model(tiny["sd1"]["folder"], vae_path=str(other))
    assert m.latent_scale == pytest.approx(0.18215) and "scaling_factor 0.13025 is not this sd1 model's" in caplog.text
    caplog.clear()  # a config without the key: diffusers' default is no claim of the VAE's, so nothing is said
    unscaled = tmp_path / "vae_unscaled"
    sdxl_cfg = {k: v for k, v in tiny_config("sdxl")["vae"].items() if not k.startswith("_")}
    AutoencoderKL.from_config(sdxl_cfg).save_pretrained(unscaled)  # the tiny SDXL VAE's layout ...
    with open(unscaled / "config.json", "w") as f:  # ... without its scaling_factor
        json.dump({k: v for k, v in sdxl_cfg.items() if k != "scaling_factor"}, f)
    assert load_model(tiny["sdxl"]["folder"], vae_path=str(unscaled)).latent_scale == pytest.approx(0.13025)
    assert "scaling_factor" not in caplog.text
    with pytest.raises(ModelLoadError, match=r"unet/config.json is a UNet2DConditionModel, not a VAE"):
        load_model(tiny["sd1"]["folder"], vae_path=os.path.join(tiny["sd1"]["folder"], "unet"))
    bare = _copy_folder(tiny, "sdxl", tmp_path, "sdxl_no_scale")
    with open(bare / "vae" / "config.json") as f:
        vae_cfg = json.load(f)
    vae_cfg.pop("scaling_factor")
    with open(bare / "vae" / "config.json", "w") as f:
        json.dump(vae_cfg, f)
    assert load_model(str(bare)).latent_scale == pytest.approx(0.13025)
    # a folder without vae/ loads with --vae (its own was always loaded first: "vae/config.json is missing")
    import shutil

    # (a VAE file takes the architecture from vae/config.json, else the standard one: the tiny VAE needs its config)
    no_weights, no_vae = _copy_folder(tiny, "sd1", tmp_path, "no_weights"), _copy_folder(tiny, "sd1", tmp_path, "no_vae")
    for f in os.listdir(no_weights / "vae"):
        if f != "config.json":
            os.remove(no_weights / "vae" / f)
    shutil.rmtree(no_vae / "vae")
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_convert.vae_to_ldm(tiny["sd1"]["orig"].vae.state_dict(),
                                                                    tiny_config("sd1")["vae"]).items()}, str(vae_file))
    for folder, given in ((no_weights, vae_file), (no_vae, os.path.join(tiny["sd1"]["folder"], "vae"))):
        m = load_model(str(folder), vae_path=str(given))
        _assert_same_weights(tiny["sd1"]["orig"].vae, m.vae)
        assert m.latent_scale == pytest.approx(0.18215)


@pytest.mark.parametrize("form", ["file", "folder"])
def test_loading_in_the_training_dtype_equals_a_cast_after_an_fp32_load(tiny, tmp_path, form):
    """The trainer loads straight into its dtypes (no fp32 copy of the whole model: SDXL's host memory 13.6 ->
    7.1 GiB in bf16): every weight equals the fp32 load cast afterwards, the VAE in its own dtype (--no_half_vae)."""
    ref = tiny["sd1"]["from_" + form]
    m = load_model(tiny["sd1"][form], dtype=torch.bfloat16, vae_dtype=torch.float32)
    for got, want, dtype in ((m.unet, ref.unet, torch.bfloat16), (m.text_encoders[0], ref.text_encoders[0], torch.bfloat16),
                             (m.vae, ref.vae, torch.float32)):
        a, b = got.state_dict(), want.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == (dtype if b[k].is_floating_point() else b[k].dtype), k
            assert torch.equal(a[k], b[k].to(a[k].dtype)), k
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_convert.vae_to_ldm(ref.vae.state_dict(), tiny_config("sd1")["vae"]).items()},
              str(vae_file))
    m = load_model(tiny["sd1"][form], vae_path=str(vae_file), dtype=torch.float16)
    assert {p.dtype for p in m.vae.parameters()} == {torch.float16} == {p.dtype for p in m.unet.parameters()}


def test_a_pickle_checkpoint_is_mapped_where_its_format_allows(tmp_path, monkeypatch):
    """--allow_pickle_checkpoint: a zip-format .ckpt (torch >= 1.6) is mapped (torch.load(mmap=True): SD1.5's
    private memory 3.9 -> 2.4 GiB), a legacy one read whole; both load the same tensors."""
    calls = []
    real = torch.load

    def spy(*a, **k):
        calls.append(k.get("mmap", False))
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    for name, zipped in (("new.ckpt", True), ("old.ckpt", False)):
        torch.save({"state_dict": {"w": torch.arange(3.0)}}, tmp_path / name, _use_new_zipfile_serialization=zipped)
        calls.clear()
        sd, _ = model_util.read_state_dict(str(tmp_path / name), allow_pickle=True)
        assert torch.equal(sd["w"], torch.arange(3.0))
        assert calls == ([True] if zipped else [True, False]), name


def test_hugging_face_cache_entries_load_offline(tiny, tmp_path, monkeypatch):
    """A model in the local Hugging Face cache: the cache entry, its snapshots/ folder and its hub id (when cached)
    load; they were refused ("not a diffusers model folder", "hub model ids are not downloaded"). Nothing is
    downloaded: an uncached id is still "not found"."""
    import shutil

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import from the env
    entry = tmp_path / "hub" / "models--org--tiny-sd1"
    shutil.copytree(tiny["sd1"]["folder"], entry / "snapshots" / "abc123")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    for given in (entry, entry / "snapshots", "org/tiny-sd1"):
        m = load_model(str(given))
        _assert_same_weights(tiny["sd1"]["orig"].unet, m.unet)
        assert probe_model(str(given)) == ("sd1", False)
    with pytest.raises(ModelLoadError, match="model not found: org/other.*one already in the local Hugging Face cache"):
        load_model("org/other")


@pytest.mark.parametrize("arch, samplers", [
    ("sd1", ["input_blocks.3.0.op", "input_blocks.6.0.op", "input_blocks.9.0.op",
             "output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv"]),
    ("sdxl", ["input_blocks.3.0.op", "input_blocks.6.0.op", "output_blocks.2.2.conv", "output_blocks.5.2.conv"])])
def test_full_size_samplers_are_named_as_in_real_checkpoints(arch, samplers):
    """The down/upsampler convs of a saved single file sit under the names real v1-5 / SDXL base files use (SD1's
    first up block has no attention, so its upsampler is `.1`, the others follow an attention at `.2`). diffusers'
    loader finds an upsampler wherever it is, so the round trip cannot tell; ComfyUI, A1111 and sd-scripts read these
    exact names and would leave a misnamed upsampler out of the model."""
    from diffusers import UNet2DConditionModel

    cfg = arch_config(arch)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
    ldm = ldm_convert.unet_to_ldm(unet.state_dict(), cfg["unet"])
    found = sorted({k.removeprefix("model.diffusion_model.").rsplit(".", 1)[0] for k in ldm
                    if k.endswith((".op.weight", ".conv.weight")) and "_blocks." in k})
    assert found == sorted(samplers)


def test_a_vae_file_in_diffusers_layout_loads_as_is(tiny, tmp_path):
    """--vae pointing at a single diffusers-layout file (the diffusion_pytorch_model.safetensors of a VAE repo such
    as sd-vae-ft-mse, downloaded alone) loads those exact weights instead of being run through the LDM converter."""
    other = build_tiny_model("sd1", seed=9)
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({k: v.contiguous() for k, v in other.vae.state_dict().items()}, path)
    _assert_same_weights(other.vae, model_util.load_vae(path, tiny_config("sd1")["vae"]))


@pytest.mark.parametrize("form", ["from_folder", "from_file"])
def test_the_training_schedule_is_sd_scaled_linear(tiny, form):
    """The noise schedule every loaded model trains with is SD's (scaled_linear 0.00085..0.012 over 1000 steps): with
    another (a plain linear schedule) every noisy latent and loss target is off and the LoRA learns the wrong model.
    Reference by hand: beta_t = (sqrt(0.00085) + t/999 * (sqrt(0.012) - sqrt(0.00085)))^2, so beta_500 =
    (0.0291548 + 0.0402351)^2 = 0.0048150; alphā_999 = 0.0046601, the value real SD schedulers have."""
    sched = tiny["sd1"][form].noise_scheduler
    assert sched.config.num_train_timesteps == 1000 and len(sched.alphas_cumprod) == 1000
    assert float(sched.betas[0]) == pytest.approx(0.00085, rel=1e-5)
    assert float(sched.betas[999]) == pytest.approx(0.012, rel=1e-5)
    assert float(sched.betas[500]) == pytest.approx(0.0048150, rel=1e-4)
    assert float(sched.alphas_cumprod[999]) == pytest.approx(0.0046601, rel=1e-3)
    assert sched.config.clip_sample is False


def test_a_replacement_vae_loads_in_the_vae_dtype(tiny, tmp_path):
    """--vae with --no_half_vae: the replacement VAE is loaded in the VAE's dtype (fp32), not the training dtype, as
    the model's own VAE is; an SDXL VAE in half precision decodes/encodes to NaNs, the reason the flag exists."""
    ref = tiny["sd1"]["orig"]
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_convert.vae_to_ldm(ref.vae.state_dict(), tiny_config("sd1")["vae"]).items()},
              str(vae_file))
    vae_folder = os.path.join(tiny["sd1"]["folder"], "vae")
    for form, vae_path in (("file", str(vae_file)), ("folder", vae_folder)):
        m = load_model(tiny["sd1"][form], vae_path=vae_path, dtype=torch.bfloat16, vae_dtype=torch.float32)
        assert {p.dtype for p in m.unet.parameters()} == {torch.bfloat16}, form
        assert {p.dtype for p in m.vae.parameters()} == {torch.float32}, form
        _assert_same_weights(ref.vae, m.vae)  # the fp32 values themselves, not a bf16 round trip


def test_a_saved_sdxl_folder_loads_its_second_encoder_with_projection_in_diffusers(tiny):
    """A real consumer of save_diffusers' model_index.json: diffusers' SDXL pipeline builds text_encoder_2 as the
    class the index names. As a plain CLIPTextModel it has no text_projection (the pooled embedding SDXL's UNet is
    conditioned on), so a converted/merged model would load without it."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    with open(os.path.join(tiny["sdxl"]["folder"], "model_index.json"), encoding="utf-8") as f:
        assert json.load(f)["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"]["folder"], local_files_only=True)
    assert type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    _assert_same_weights(tiny["sdxl"]["orig"].text_encoders[1], pipe.text_encoder_2)


def test_a_tokenizer_folder_without_a_config_gets_77_token_windows(tiny, tmp_path):
    """--tokenizer_path to a bare vocab.json + merges.txt folder (no tokenizer_config.json): transformers then sets
    model_max_length to 1e30, and anything that truncates to the tokenizer's length (diffusers' pipelines, sample
    prompts) feeds the 77-position CLIP encoder longer sequences. It is clamped to SD's 77, with the slot's pad."""
    import shutil

    bare = tmp_path / "bare_tok"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tiny["sd1"]["folder"], "tokenizer", name), bare / name)
    m = load_model(tiny["sd2"]["file"], tokenizer_path=str(bare))
    tok = m.tokenizers[0]
    assert tok.model_max_length == 77 and tok.pad_token == "!"
    ids = tok(" ".join(["dog"] * 200), truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407


def test_a_saved_folder_is_readable_as_the_umask_allows(tiny, tmp_path):
    """save_diffusers builds in a private temp folder (mkdtemp: 0700) and renames it into place; the result gets the
    permissions a plain mkdir would (0755 under umask 022), or a UI or trainer running as another user (a shared
    server, a container) cannot open the converted model."""
    old = os.umask(0o022)
    try:
        folder = model_util.save_diffusers(tiny["sd1"]["orig"], tmp_path / "shared_model")
    finally:
        os.umask(old)
    assert os.stat(folder).st_mode & 0o777 == 0o755


def test_a_cache_entry_with_two_snapshots_loads_the_one_refs_main_names(tiny, tmp_path):
    """After a model is updated in the Hugging Face cache its entry holds two snapshots; refs/main names the current
    one. Without it the pick is ambiguous, so the entry itself is returned (and refused), never a guessed snapshot."""
    import shutil

    entry = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny["sd2"]["folder"], entry / "snapshots" / "aaa111")  # the old one, first by name
    shutil.copytree(tiny["sd1"]["folder"], entry / "snapshots" / "bbb222")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("bbb222\n")
    assert model_util.local_model_path(str(entry)) == str(entry / "snapshots" / "bbb222")
    assert probe_model(str(entry)) == ("sd1", False)
    os.remove(entry / "refs" / "main")
    assert model_util.local_model_path(str(entry)) == str(entry)


def test_an_sdxl_model_with_a_single_tokenizer_folder_pads_each_slot_as_its_encoder(tiny):
    """--tokenizer_path to a model folder holding only tokenizer/ (an SD1 folder) for an SDXL model: the second slot
    reuses that vocabulary but must pad as OpenCLIP does ("!", id 0), not with the folder's EOS (49407). Another pad
    changes every short caption's embedding from encoder 2, and the pooled one the UNet is conditioned on."""
    m = load_model(tiny["sdxl"]["file"], tokenizer_path=tiny["sd1"]["folder"])
    assert [t.pad_token for t in m.tokenizers] == ["<|endoftext|>", "!"]
    padded = [t("a photo of a dog", padding="max_length", max_length=77).input_ids for t in m.tokenizers]
    assert padded[0] == DOG + [49407] * 70
    assert padded[1] == DOG + [0] * 70


def test_a_single_file_without_a_vae_loads_with_vae(tiny, tmp_path):
    """A pruned checkpoint without first_stage_model.* keys (UNet and text encoder only) is refused alone ("Pass a
    VAE with --vae") and loads with --vae: the UNet from the file, the VAE from --vae."""
    full = load_file(tiny["sd1"]["file"])
    path = str(tmp_path / "no_vae.safetensors")
    save_file({k: v for k, v in full.items() if not k.startswith("first_stage_model.")}, path,
              metadata={model_util.CONFIGS_KEY: json.dumps(tiny_config("sd1"))})
    with pytest.raises(ModelLoadError, match="has no VAE .*--vae"):
        load_model(path)
    m = load_model(path, vae_path=os.path.join(tiny["sd1"]["folder"], "vae"))
    _assert_same_weights(tiny["sd1"]["orig"].unet, m.unet)
    _assert_same_weights(tiny["sd1"]["orig"].vae, m.vae)


def test_save_diffusers_into_an_empty_existing_folder(tiny, tmp_path):
    """An output folder made beforehand (mkdir, a file dialog) but still empty is free to use: refusing it as
    "already exists" without --overwrite loses the conversion for nothing. A non-empty one is still refused."""
    target = tmp_path / "made_before"
    target.mkdir()
    model_util.save_diffusers(tiny["sd1"]["orig"], target)
    _assert_same_weights(tiny["sd1"]["orig"].unet, load_model(str(target)).unet)
    with pytest.raises(FileExistsError):
        model_util.save_diffusers(tiny["sd1"]["orig"], target)


def test_a_component_folder_prefers_its_full_precision_weights(tmp_path):
    """A folder with both diffusion_pytorch_model.safetensors and its .fp16 variant (as many hub repos ship): the
    plain, full-precision weights are loaded; the fp16 variant only when it is all there is."""
    d = tmp_path / "unet"
    d.mkdir()
    for name in ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors",
                 "diffusion_pytorch_model.ema.safetensors"):
        (d / name).write_bytes(b"")
    assert model_util._weights_kwargs(str(d), allow_pickle=False) == {"use_safetensors": True, "variant": None}
    os.remove(d / "diffusion_pytorch_model.safetensors")
    assert model_util._weights_kwargs(str(d), allow_pickle=False) == {"use_safetensors": True, "variant": "fp16"}


def test_a_replacement_vae_with_latent_statistics_is_refused(tiny, tmp_path):
    """--vae to a 4-channel VAE whose config carries latents_mean/latents_std (Playground v2.5's, an EDM model's):
    its latents are normalised by those statistics, not by the SD scaling factor, so training on them with this
    model's schedule is wrong. It is refused by name like an EDM model folder."""
    from diffusers import AutoencoderKL

    cfg = {k: v for k, v in tiny_config("sd1")["vae"].items() if not k.startswith("_")}
    stats = tmp_path / "vae_stats"
    AutoencoderKL.from_config({**cfg, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}).save_pretrained(stats)
    with pytest.raises(ModelLoadError, match=r"--vae .*vae_stats: its config has latents_mean/shift_factor"):
        load_model(tiny["sd1"]["folder"], vae_path=str(stats))



def test_an_sd2_model_with_an_sd1_tokenizer_folder_pads_as_its_encoder(tiny):
    """--tokenizer_path to an SD1 model folder for an SD2 model: the vocabulary is the same, but SD2's OpenCLIP
    encoder pads with "!" (id 0); the folder's tokenizer/ kept its EOS pad (49407) while the same files given flat
    got "!", so every short caption's SD2 embedding depended on how the path was written."""
    for path in (tiny["sd1"]["folder"], os.path.join(tiny["sd1"]["folder"], "tokenizer")):
        tok = load_model(tiny["sd2"]["file"], tokenizer_path=path).tokenizers[0]
        assert tok.pad_token == "!", path
        assert tok("a photo of a dog", padding="max_length", max_length=77).input_ids == DOG + [0] * 70, path
