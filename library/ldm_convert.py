"""Key conversion between diffusers/transformers modules and single-file LDM (SD1/SD2) / SGM (SDXL) checkpoints.

LDM → diffusers uses diffusers' own `single_file_utils` converters (the same code `from_single_file` runs), fed
with the project's configs so nothing is fetched from the hub. diffusers has no public converter for the other
direction, so `to_ldm` uses our own block maps (the formula of diffusers' `convert_diffusers_to_original_*`
scripts and sd-scripts' `make_unet_conversion_map`, generalised to any `layers_per_block`/block count so tiny
models round-trip too). tests/test_model_util.py checks that both directions are exact inverses, also at full size.
"""
from __future__ import annotations

import math

import torch
from diffusers.loaders import single_file_utils as sfu

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Text encoder prefixes per architecture: (prefix, kind); kind "hf" = transformers CLIP, "openclip" = OpenCLIP.
TE_PREFIXES = {
    "sd1": [("cond_stage_model.transformer.", "hf")],
    "sd2": [("cond_stage_model.model.", "openclip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "openclip")],
}


# --------------------------------------------------------------------------------------------- LDM -> diffusers
def unet_to_diffusers(sd: dict, unet_config: dict) -> dict:
    """UNet weights under `model.diffusion_model.` → diffusers `UNet2DConditionModel` keys."""
    return sfu.convert_ldm_unet_checkpoint(sd, dict(unet_config))


def vae_to_diffusers(sd: dict, vae_config: dict) -> dict:
    """LDM VAE weights (with `first_stage_model.`/`vae.` prefix, or none) → diffusers `AutoencoderKL` keys.

    A VAE file that is already in diffusers layout is passed through unchanged."""
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        return dict(sd)
    prefixed = {k: v for k, v in sd.items() if k.startswith(tuple(sfu.LDM_VAE_KEYS))}
    return sfu.convert_ldm_vae_checkpoint(prefixed or sd, dict(vae_config))


def _strip_text_model(sd: dict, module_keys: set) -> dict:
    """transformers 5 `CLIPTextModel` has no `text_model.` prefix (`CLIPTextModelWithProjection` keeps it)."""
    if any(k.startswith("text_model.") for k in module_keys):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def text_encoder_to_diffusers(sd: dict, prefix: str, kind: str, text_encoder) -> dict:
    """One text encoder's weights under `prefix` → the keys of `text_encoder` (a transformers CLIP model).

    OpenCLIP files may hold more layers than the model keeps (real SD2 files: 24; diffusers/sd-scripts keep 23,
    since the penultimate layer is the output); the extra trailing layers are dropped here."""
    n_layers = text_encoder.config.num_hidden_layers
    sub = {}
    for k, v in sd.items():
        if not k.startswith(prefix) or k.endswith("position_ids"):
            continue
        if kind == "openclip" and k.startswith(prefix + "transformer.resblocks."):
            if int(k[len(prefix + "transformer.resblocks.") :].split(".")[0]) >= n_layers:
                continue
        sub[k] = v
    if kind == "hf":
        out = sfu.convert_ldm_clip_checkpoint(sub, remove_prefix=prefix)
        # very old SD1 files lack the `text_model.` level under `transformer.`
        out = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in out.items()}
    else:
        out = sfu.convert_open_clip_checkpoint(text_encoder, sub, prefix=prefix)
    module_keys = set(text_encoder.state_dict().keys())
    if "text_projection.weight" not in module_keys:  # SD2: CLIPTextModel has no projection
        out.pop("text_projection.weight", None)
    return _strip_text_model(out, module_keys)


# --------------------------------------------------------------------------------------------- diffusers -> LDM
_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_prefix_map(cfg: dict) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is_resnet) for every block of a UNet with this config."""
    n = cfg["layers_per_block"] + 1
    downs, ups = cfg["down_block_types"], cfg["up_block_types"]
    m = [("time_embedding.linear_1.", "time_embed.0.", False), ("time_embedding.linear_2.", "time_embed.2.", False),
         ("add_embedding.linear_1.", "label_emb.0.0.", False), ("add_embedding.linear_2.", "label_emb.0.2.", False),
         ("conv_in.", "input_blocks.0.0.", False), ("conv_norm_out.", "out.0.", False), ("conv_out.", "out.2.", False),
         ("mid_block.resnets.0.", "middle_block.0.", True), ("mid_block.attentions.0.", "middle_block.1.", False),
         ("mid_block.resnets.1.", "middle_block.2.", True)]
    for i in range(len(downs)):
        for j in range(n - 1):
            m.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n * i + j + 1}.0.", True))
            m.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n * i + j + 1}.1.", False))
        if i < len(downs) - 1:
            m.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{n * (i + 1)}.0.op.", False))
    for i, kind in enumerate(ups):
        for j in range(n):
            m.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n * i + j}.0.", True))
            m.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n * i + j}.1.", False))
        if i < len(ups) - 1:  # the upsampler follows the attention when the block has one
            m.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{n * i + n - 1}.{2 if 'CrossAttn' in kind else 1}.", False))
    return sorted(m, key=lambda t: -len(t[0]))


def unet_to_ldm(sd: dict, unet_config: dict) -> dict:
    """diffusers UNet state dict → `model.diffusion_model.*` keys."""
    pmap = _unet_prefix_map(unet_config)
    out = {}
    for k, v in sd.items():
        for dk, lk, is_resnet in pmap:
            if k.startswith(dk):
                rest = k[len(dk) :]
                if is_resnet:
                    head, _, tail = rest.partition(".")
                    rest = f"{_RESNET_UNET.get(head, head)}.{tail}"
                out[UNET_PREFIX + lk + rest] = v
                break
        else:
            raise KeyError(f"no LDM name for UNet key {k!r}")
    return out


def vae_to_ldm(sd: dict, vae_config: dict, prefix: str = VAE_PREFIX) -> dict:
    """diffusers AutoencoderKL state dict → LDM VAE keys (attention projections as 1x1 convs, as in real files)."""
    n_up = len(vae_config["up_block_types"])
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[1] == "down_blocks":  # encoder.down_blocks.i.{resnets.j | downsamplers.0}.rest
            i = parts[2]
            head = f"encoder.down.{i}.block.{parts[4]}" if parts[3] == "resnets" else f"encoder.down.{i}.downsample"
            rest = parts[5:]
        elif parts[1] == "up_blocks":
            i = n_up - 1 - int(parts[2])
            head = f"decoder.up.{i}.block.{parts[4]}" if parts[3] == "resnets" else f"decoder.up.{i}.upsample"
            rest = parts[5:]
        elif parts[1] == "mid_block":
            head = f"{parts[0]}.mid.block_{int(parts[3]) + 1}" if parts[2] == "resnets" else f"{parts[0]}.mid.attn_1"
            rest = parts[4:]
            if parts[2] == "attentions":
                r = ".".join(rest)
                for a, b in _VAE_ATTN.items():
                    if r.startswith(a + "."):
                        r = b + r[len(a) :]
                        break
                rest = r.split(".")
                if v.ndim == 2:
                    v = v[:, :, None, None]
        else:  # conv_in, conv_out, conv_norm_out, quant_conv, post_quant_conv keep their names
            out[prefix + k.replace("conv_norm_out", "norm_out")] = v
            continue
        rest = ["nin_shortcut" if p == "conv_shortcut" else p for p in rest]
        out[prefix + ".".join([head, *rest])] = v
    return out


def hf_clip_to_ldm(sd: dict, prefix: str) -> dict:
    """transformers CLIP state dict → `<prefix>text_model.*` (the HF CLIP layout SD1 and SDXL files use)."""
    return {prefix + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in sd.items() if not k.endswith("position_ids")}


def open_clip_to_ldm(sd: dict, prefix: str, extra_identity_layer: bool = False) -> dict:
    """transformers CLIP state dict → OpenCLIP layout (fused in_proj, `text_projection` as (width, proj)).

    `extra_identity_layer` appends one more resblock (SD2 files have 24; models keep 23) whose output
    projections are zero, so it is an exact identity: any reader gets the same result whether it uses the
    last or the penultimate layer."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    out = {}
    rb = prefix + "transformer.resblocks."
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        p = f"encoder.layers.{i}."
        for wb in ("weight", "bias"):
            out[f"{rb}{i}.attn.in_proj_{wb}"] = torch.cat([sd[f"{p}self_attn.{q}_proj.{wb}"] for q in "qkv"], 0)
            out[f"{rb}{i}.attn.out_proj.{wb}"] = sd[f"{p}self_attn.out_proj.{wb}"]
            out[f"{rb}{i}.ln_1.{wb}"] = sd[f"{p}layer_norm1.{wb}"]
            out[f"{rb}{i}.ln_2.{wb}"] = sd[f"{p}layer_norm2.{wb}"]
            out[f"{rb}{i}.mlp.c_fc.{wb}"] = sd[f"{p}mlp.fc1.{wb}"]
            out[f"{rb}{i}.mlp.c_proj.{wb}"] = sd[f"{p}mlp.fc2.{wb}"]
    out[prefix + "token_embedding.weight"] = sd["embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = sd["embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = sd["final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = sd["final_layer_norm.bias"]
    like = sd["final_layer_norm.weight"]
    width = like.shape[0]
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    else:  # SD2: the model has no projection; real files carry OpenCLIP's (width, width) one
        out[prefix + "text_projection"] = torch.eye(width, dtype=like.dtype, device=like.device)
    out[prefix + "logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=like.dtype, device=like.device)
    if extra_identity_layer and layers:
        last, new = f"{rb}{layers[-1]}.", f"{rb}{layers[-1] + 1}."
        for k in [k for k in out if k.startswith(last)]:
            v = out[k]
            zero = ".out_proj." in k or ".c_proj." in k
            out[new + k[len(last) :]] = torch.zeros_like(v) if zero else v.clone()
    return out


def to_ldm(arch: str, unet_sd: dict, vae_sd: dict, te_sds: list, configs: dict) -> dict:
    """All parts of a model → one single-file state dict in the LDM (SD1/SD2) or SGM (SDXL) layout."""
    out = unet_to_ldm(unet_sd, configs["unet"])
    out.update(vae_to_ldm(vae_sd, configs["vae"]))
    for (prefix, kind), te_sd in zip(TE_PREFIXES[arch], te_sds):
        if kind == "hf":
            out.update(hf_clip_to_ldm(te_sd, prefix))
        else:
            out.update(open_clip_to_ldm(te_sd, prefix, extra_identity_layer=(arch == "sd2")))
    return out
