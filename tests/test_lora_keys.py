"""LoRA module names and shapes equal what sd-scripts writes (tests/data/kohya_lora_keys.json), on full-size
weightless (meta) SD1 / SD2 / SDXL models."""
import json
import os

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.model_util import arch_config, build_from_config
from networks.lora import LoRANetwork, kohya_module_names

DATA = os.path.join(os.path.dirname(__file__), "data", "kohya_lora_keys.json")
RANK, CONV_RANK = 8, 4

# (text-encoder modules, UNet LierLa modules, C3Lier extra modules): KOHYA_COMPAT §1.3-1.5
COUNTS = {"sd1": (72, 192, 86), "sd2": (138, 192, 86), "sdxl": (264, 722, 66)}


@pytest.fixture(scope="module")
def reference():
    with open(DATA, encoding="utf-8") as f:
        return json.load(f)


_MODELS = {}


def meta_model(arch):
    if arch not in _MODELS:
        with torch.device("meta"):
            _MODELS[arch] = build_from_config(arch_config(arch), tokenizers=[])
    return _MODELS[arch]


def _expected(entries, rank, conv_rank):
    out = {}
    for name, e in entries.items():
        r = conv_rank if e["module"] == "Conv2d" and e["lora_down"][2:] not in ([], [1, 1]) else rank
        sub = lambda shape: tuple(r if d == "r" else d for d in shape)  # noqa: E731
        out[name] = (sub(e["lora_down"]), sub(e["lora_up"]))
    return out


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("variant", ["lierla", "c3lier"])
def test_network_names_and_shapes_match_sd_scripts(arch, variant, reference):
    model = meta_model(arch)
    with torch.device("meta"):
        net = LoRANetwork(model, lora_dim=RANK, alpha=4.0, conv_lora_dim=CONV_RANK if variant == "c3lier" else None,
                          train_text_encoder=True)
    expected = _expected(reference[f"{arch}_{variant}"], RANK, CONV_RANK)

    got = {m.lora_name: (tuple(m.lora_down.weight.shape), tuple(m.lora_up.weight.shape)) for m in net.loras}
    assert set(got) == set(expected), (sorted(set(expected) - set(got))[:5], sorted(set(got) - set(expected))[:5])
    wrong = {k: (got[k], expected[k]) for k in got if got[k] != expected[k]}
    assert not wrong, list(wrong.items())[:5]

    n_te, n_unet, n_c3 = COUNTS[arch]
    assert len(net.text_encoder_loras) == n_te
    assert len(net.unet_loras) == n_unet + (n_c3 if variant == "c3lier" else 0)

    # the network's state_dict is exactly the kohya file layout: 3 tensors per module
    keys = set(net.state_dict())
    assert keys == {f"{n}.{s}" for n in expected for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert len(keys) == 3 * len(expected)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_conv_dim_0_adapts_the_conv_blocks_linear_and_1x1_layers(arch, reference):
    """sd-scripts' conv_dim=0: the ResNet/down/upsampler blocks are targeted, their Linear and 1x1 layers at
    network_dim, their 3x3 convs not at all: the C3Lier names less the 3x3 convs (it was the LierLa set here, and a
    file made so could not be loaded)."""
    with torch.device("meta"):
        net = LoRANetwork(meta_model(arch), lora_dim=RANK, conv_lora_dim=0, train_text_encoder=True)
    expected = {n: s for n, s in _expected(reference[f"{arch}_c3lier"], RANK, 0).items() if s[0][0] == RANK}
    got = {m.lora_name: (tuple(m.lora_down.weight.shape), tuple(m.lora_up.weight.shape)) for m in net.loras}
    assert got == expected and len(got) > len(reference[f"{arch}_lierla"])


def test_totals():
    # KOHYA_COMPAT §1.5: SD1 LierLa 264 modules (792 tensors), SDXL LierLa 986 modules (2958 tensors)
    assert len(kohya_module_names(meta_model("sd1"), "lierla")) == 264
    assert len(kohya_module_names(meta_model("sdxl"), "lierla")) == 986
    with torch.device("meta"):
        assert len(LoRANetwork(meta_model("sd1")).state_dict()) == 792
        assert len(LoRANetwork(meta_model("sdxl")).state_dict()) == 2958


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("variant", ["lierla", "c3lier"])
def test_kohya_module_names_equals_reference(arch, variant, reference):
    got = kohya_module_names(meta_model(arch), variant)
    expected = {k: (tuple(e["lora_down"]), tuple(e["lora_up"])) for k, e in reference[f"{arch}_{variant}"].items()}
    assert got == expected


def test_kohya_module_names_with_numeric_ranks():
    names = kohya_module_names(meta_model("sd1"), "c3lier", rank=16, conv_rank=8)
    assert names["lora_unet_down_blocks_0_attentions_0_proj_in"] == ((16, 320, 1, 1), (320, 16, 1, 1))
    assert names["lora_unet_down_blocks_0_resnets_0_conv1"] == ((8, 320, 3, 3), (320, 8, 1, 1))
    assert names["lora_unet_down_blocks_0_resnets_0_time_emb_proj"] == ((16, 1280), (320, 16))
    assert names["lora_te_text_model_encoder_layers_0_mlp_fc1"] == ((16, 768), (3072, 16))


def _te_names(net, prefix):
    return sorted(m.lora_name for m in net.text_encoder_loras if m.lora_name.startswith(prefix + "_"))


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_text_encoder_names_do_not_depend_on_the_transformers_module_tree(arch):
    """transformers 5's CLIPTextModel has no `text_model.` in its module paths, CLIPTextModelWithProjection (and
    transformers 4's CLIPTextModel) has: the LoRA names must be the canonical ones either way."""
    import dataclasses

    model = meta_model(arch)
    cfgs = [model.configs["text_encoder"]] + ([model.configs["text_encoder_2"]] if arch == "sdxl" else [])
    cfgs = [CLIPTextConfig(**{k: v for k, v in c.items() if k != "architectures"}) for c in cfgs]
    with torch.device("meta"):
        # transformers 4's CLIPTextModel keeps the flat tree one level down, in `.text_model`
        plain = [getattr(m, "text_model", m) for m in (CLIPTextModel(c) for c in cfgs)]
        wrapped = [CLIPTextModelWithProjection(c) for c in cfgs]
        assert not any(n.startswith("text_model.") for n, _ in plain[0].named_modules())
        assert any(n.startswith("text_model.") for n, _ in wrapped[0].named_modules())
        net_plain = LoRANetwork(dataclasses.replace(model, text_encoders=plain), train_unet=False)
        net_wrapped = LoRANetwork(dataclasses.replace(model, text_encoders=wrapped), train_unet=False)

    plain_names = [m.lora_name for m in net_plain.text_encoder_loras]
    assert sorted(plain_names) == sorted(m.lora_name for m in net_wrapped.text_encoder_loras)
    prefixes = ["lora_te"] if arch == "sd1" else ["lora_te1", "lora_te2"]
    for i, (prefix, cfg) in enumerate(zip(prefixes, cfgs)):
        expected = sorted(f"{prefix}_text_model_encoder_layers_{layer}_{s}" for layer in range(cfg.num_hidden_layers)
                          for s in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                                    "mlp_fc1", "mlp_fc2"))
        assert _te_names(net_plain, prefix) == expected
    assert not any("text_projection" in n for n in plain_names)
