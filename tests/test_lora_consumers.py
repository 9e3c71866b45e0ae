"""Real consumers of the LoRA files we write.

* diffusers end to end: tiny SD1 / SD2 / SDXL models, LoRA with random nonzero weights (UNet and text encoders), saved,
  loaded with `pipe.load_lora_weights(folder, weight_name=file)` (the form every diffusers version takes) into a
  diffusers pipeline built from an identical tiny model: nothing is
  left unloaded, and the pipeline's UNet / text encoders give the same outputs as our patched model (multiplier 1).
* diffusers on full-size key sets (weightless): its kohya converter maps every module to a module of the right type
  and shape in a meta UNet / text encoder (KOHYA_COMPAT §3.3 offline check).
* ComfyUI's key-map rule (KOHYA_COMPAT §3.1 option 2, re-implemented here from its description): every module name
  of the full-size SD1 / SD2 / SDXL key sets is matched, and the ΔW reshapes onto the weight it patches.
"""
import logging
import math
import warnings

import pytest
import torch
from peft.tuners.lora import LoraLayer

from library.model_util import arch_config, build_from_config
from library.tiny_models import build_tiny_model
from networks.lora import LoRANetwork, kohya_module_names
from tests.test_train_e2e import load_in_diffusers

ATOL = 1e-5  # outputs of our patched model vs the diffusers/PEFT-loaded pipeline (fp32, CPU); observed: 0.0


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _collect_library_warnings():
    """diffusers and transformers loggers do not propagate to the root logger (so caplog misses them): attach a
    handler to each library's root logger. diffusers reports LoRA keys PEFT could not place as a WARNING
    ("Loading adapter weights from state_dict led to unexpected keys ..." from diffusers.utils.peft_utils), and
    transformers' load_adapter (text encoders) prints a WARNING "LOAD REPORT" listing UNEXPECTED keys."""
    handler = _Records()
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).addHandler(handler)
    return handler


def _remove(handler):
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).removeHandler(handler)


def _pipeline(model):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kw = dict(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
              scheduler=model.noise_scheduler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler-config deprecation notices
        if model.is_sdxl:
            return StableDiffusionXLPipeline(text_encoder_2=model.text_encoders[1], tokenizer_2=model.tokenizers[1],
                                             **kw)
        return StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **kw)


def _unet_inputs(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([20, 800])
    ctx = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=g)
    kw = {}
    if model.is_sdxl:
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, model.text_encoders[1].config.projection_dim, generator=g),
            "time_ids": torch.randn(2, 6, generator=g)}
    return (x, t, ctx), kw


@pytest.mark.parametrize("arch,conv_dim", [("sd1", None), ("sd1", 3), ("sd2", None), ("sdxl", None), ("sdxl", 3)])
def test_diffusers_pipeline_loads_our_lora(arch, conv_dim, tmp_path):
    ours = build_tiny_model(arch, seed=0)
    theirs = build_tiny_model(arch, seed=0)  # identical weights, untouched by our network
    net = LoRANetwork(ours, lora_dim=4, alpha=2.0, conv_lora_dim=conv_dim, conv_alpha=1.5 if conv_dim else None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.apply_to()
    path = str(tmp_path / "lora.safetensors")
    net.save_weights(path, None, {"ss_network_module": "networks.lora"})

    pipe = _pipeline(theirs)
    handler = _collect_library_warnings()
    try:
        with warnings.catch_warnings(record=True) as py_warnings:
            warnings.simplefilter("always")
            load_in_diffusers(pipe, path)
    finally:
        _remove(handler)
    messages = [r.getMessage() for r in handler.records] + [str(w.message) for w in py_warnings]
    assert not messages, messages

    # every module of the file became a PEFT LoRA layer in the right component
    n_unet = sum(isinstance(m, LoraLayer) for m in pipe.unet.modules())
    assert n_unet == len(net.unet_loras)
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if ours.is_sdxl else [])
    prefixes = ["lora_te"] if not ours.is_sdxl else ["lora_te1", "lora_te2"]
    for te, prefix in zip(tes, prefixes):
        n_ours = sum(m.lora_name.startswith(prefix + "_") for m in net.text_encoder_loras)
        assert n_ours > 0 and sum(isinstance(m, LoraLayer) for m in te.modules()) == n_ours

    with torch.no_grad():
        (x, t, ctx), kw = _unet_inputs(ours)
        a = ours.unet(x, t, ctx, **kw).sample
        b = pipe.unet(x, t, ctx, **kw).sample
        with net.multiplier_override(0.0):
            base = ours.unet(x, t, ctx, **kw).sample
        assert (a - base).abs().max() > 1e-2  # the LoRA does something
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)

        ids = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(2))
        for te_ours, te_pipe in zip(ours.text_encoders, tes):
            ha = te_ours(ids, output_hidden_states=True).hidden_states
            hb = te_pipe(ids, output_hidden_states=True).hidden_states
            for x1, x2 in zip(ha, hb):
                torch.testing.assert_close(x2, x1, atol=ATOL, rtol=0)
            with net.multiplier_override(0.0):  # the TE LoRA does something
                plain = te_ours(ids, output_hidden_states=True).hidden_states[-1]
            assert (plain - ha[-1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# full-size key sets, weightless

_META = {}


def meta_model(arch):
    if arch not in _META:
        with torch.device("meta"):
            _META[arch] = build_from_config(arch_config(arch), tokenizers=[])
    return _META[arch]


def _zero_lora(names):
    sd = {}
    for n, (down, up) in names.items():
        sd[f"{n}.lora_down.weight"] = torch.zeros(down)
        sd[f"{n}.lora_up.weight"] = torch.zeros(up)
        sd[f"{n}.alpha"] = torch.tensor(1.0)
    return sd


def _check_peft_target(module, a_shape, b_shape, where):
    if isinstance(module, torch.nn.Linear):
        assert a_shape == (1, module.in_features) and b_shape == (module.out_features, 1), where
    else:
        assert isinstance(module, torch.nn.Conv2d), where
        assert a_shape == (1, module.in_channels, *module.kernel_size), where
        assert b_shape == (module.out_channels, 1, 1, 1), where


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("variant", ["lierla", "c3lier"])
def test_diffusers_converts_full_size_key_sets(arch, variant):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, \
        convert_unet_state_dict_to_peft

    model = meta_model(arch)
    names = kohya_module_names(model, variant, rank=1)
    sd = _zero_lora(names)
    if model.is_sdxl:
        converted, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(sd, unet_config=model.unet.config)
    else:
        converted, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(sd)
    assert len(alphas) == len(names)

    components = {"unet": model.unet, "text_encoder": model.text_encoders[0]}
    if model.is_sdxl:
        components["text_encoder_2"] = model.text_encoders[1]
    assert {k.split(".", 1)[0] for k in converted} == set(components)
    n_targets = 0
    for comp, module in components.items():
        part = {k[len(comp) + 1:]: v for k, v in converted.items() if k.startswith(comp + ".")}
        if comp == "unet":
            peft_sd = convert_unet_state_dict_to_peft(part)
        else:  # what diffusers' _load_lora_into_text_encoder does, including the transformers-5 prefix strip
            peft_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            if not hasattr(module, "text_model"):
                peft_sd = {k.removeprefix("text_model."): v for k, v in peft_sd.items()}
        mods = dict(module.named_modules())
        targets = {k.rsplit(".lora_", 1)[0] for k in peft_sd}
        for tgt in targets:
            assert tgt in mods, f"{comp}: {tgt} not in the model"
            a, b = peft_sd[f"{tgt}.lora_A.weight"], peft_sd[f"{tgt}.lora_B.weight"]
            _check_peft_target(mods[tgt], tuple(a.shape), tuple(b.shape), f"{comp}.{tgt}")
        assert len(peft_sd) == 2 * len(targets)
        n_targets += len(targets)
    assert n_targets == len(names)


# ---------------------------------------------------------------------------------------------------------------------
# ComfyUI key-map rule (comfy.utils.unet_to_diffusers + model_lora_keys_unet / model_lora_keys_clip), re-implemented
# from KOHYA_COMPAT §3.1: the diffusers<->LDM module map is generated from ComfyUI's unet_config, and both the
# lora_unet_<ldm> and lora_unet_<diffusers> spellings are accepted.

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_ATTENTION = ["norm", "proj_in", "proj_out"]
_TRANSFORMER = ["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"] + [
    f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]

COMFY_UNET_CONFIGS = {  # comfy/model_detection for SD15 / SD21 / SDXL
    "sd1": dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                transformer_depth_output=[1] * 9 + [0, 0, 0], transformer_depth_middle=1),
    "sdxl": dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10),
}
COMFY_UNET_CONFIGS["sd2"] = COMFY_UNET_CONFIGS["sd1"]
COMFY_CLIP_LAYERS = {"sd1": {"l": 12}, "sd2": {"h": 24}, "sdxl": {"l": 12, "g": 32}}
_CLIP_SUFFIXES = {"self_attn.q_proj": "self_attn_q_proj", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj",
                  "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2"}


def comfy_diffusers_to_ldm(cfg) -> dict:
    """diffusers module path -> LDM module path, by ComfyUI's index rule (module level; weights/biases dropped)."""
    res, depth, depth_out = cfg["num_res_blocks"], list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"])
    out = {}

    def attention(dif, ldm, n_transformers):
        for a in _ATTENTION:
            out[f"{dif}.{a}"] = f"{ldm}.{a}"
        for t in range(n_transformers):
            for b in _TRANSFORMER:
                out[f"{dif}.transformer_blocks.{t}.{b}"] = f"{ldm}.transformer_blocks.{t}.{b}"

    def resnet(dif, ldm):
        for lk, dk in _RESNET.items():
            out[f"{dif}.{dk}"] = f"{ldm}.{lk}"

    for x in range(len(cfg["channel_mult"])):
        n = 1 + (res[x] + 1) * x
        for i in range(res[x]):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0")
            d = depth.pop(0)
            if d > 0:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", d)
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    attention("mid_block.attentions.0", "middle_block.1", cfg["transformer_depth_middle"])
    resnet("mid_block.resnets.0", "middle_block.0")
    resnet("mid_block.resnets.1", "middle_block.2")
    res_up = list(reversed(res))
    for x in range(len(cfg["channel_mult"])):
        n = (res_up[x] + 1) * x
        layers = res_up[x] + 1
        for i in range(layers):
            c = 1
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            d = depth_out.pop()
            if d > 0:
                c += 1
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", d)
            if i == layers - 1:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    return out


def comfy_key_map(arch) -> dict:
    """LoRA module name -> diffusers module path of the target (for the shape check)."""
    key_map = {}
    for dif, ldm in comfy_diffusers_to_ldm(COMFY_UNET_CONFIGS[arch]).items():
        key_map["lora_unet_" + ldm.replace(".", "_")] = ("unet", dif)
        key_map["lora_unet_" + dif.replace(".", "_")] = ("unet", dif)
    clip = COMFY_CLIP_LAYERS[arch]
    for b in range(32):
        for c, cc in _CLIP_SUFFIXES.items():
            if b < clip.get("l", 0):
                for p in ("lora_te", "lora_te1"):
                    key_map[f"{p}_text_model_encoder_layers_{b}_{cc}"] = ("te0", f"encoder.layers.{b}.{c}")
            if b < clip.get("h", 0):
                for p in ("lora_te", "lora_te1"):
                    key_map[f"{p}_text_model_encoder_layers_{b}_{cc}"] = ("te0", f"encoder.layers.{b}.{c}")
            if b < clip.get("g", 0) and "l" in clip:
                key_map[f"lora_te2_text_model_encoder_layers_{b}_{cc}"] = ("te1", f"encoder.layers.{b}.{c}")
    return key_map


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("variant", ["lierla", "c3lier"])
def test_comfyui_key_map_matches_every_module(arch, variant):
    model = meta_model(arch)
    names = kohya_module_names(model, variant, rank=1)
    key_map = comfy_key_map(arch)
    unmatched = sorted(set(names) - set(key_map))
    assert not unmatched, unmatched[:10]

    ldm_paths = comfy_diffusers_to_ldm(COMFY_UNET_CONFIGS[arch]).values()
    unet_ldm = {"lora_unet_" + ldm.replace(".", "_") for ldm in ldm_paths}
    if arch == "sdxl":  # SGM names (what sd-scripts writes; A1111 needs them for SDXL)
        assert all(n in unet_ldm for n in names if n.startswith("lora_unet_"))

    mods = {"unet": dict(model.unet.named_modules())}
    for i, te in enumerate(model.text_encoders):
        # module paths without `text_model.`, which transformers 4 (and 5's WithProjection class) put in front
        mods[f"te{i}"] = {n.removeprefix("text_model."): m for n, m in te.named_modules()}
    for name, (down, up) in names.items():
        comp, path = key_map[name]
        w = mods[comp][path].weight
        # ComfyUI: weight += (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        assert up[0] == w.shape[0], name
        assert math.prod(down[1:]) == math.prod(w.shape[1:]), name
