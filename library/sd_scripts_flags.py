"""sd-scripts' `train_network.py` flags that this trainer does not implement, by name.

A command line or a `--config_file` carried over from sd-scripts should not fail with argparse's bare
"unrecognized arguments": each flag here is registered so that it fails with what it does and what to do instead
(`NOT_IMPLEMENTED`), or, where it has nothing to do in this trainer, is accepted and reported (`NO_EFFECT`).
The dataset TOML's sd-scripts keys are handled the same way in `config_util`.
"""
from __future__ import annotations

import argparse

NOT_IMPLEMENTED = {  # flag -> what it does in sd-scripts; what to do here
    "fused_backward_pass": "Adafactor's optimizer step fused into the backward (full fine-tuning); leave it out",
    "full_fp16": "fp16 LoRA weights, gradients and optimizer states; use --mixed_precision fp16 (fp32 LoRA weights), "
                 "or --mixed_precision bf16 --full_bf16 for the memory saving (AdamW's fp16 states underflow)",
    "cpu_offload_checkpointing": "checkpointed activations kept on the CPU; use --gradient_checkpointing",
    "deepspeed": "DeepSpeed training; train with accelerate launch (data parallel)",
    "train_inpainting": "inpainting training (random masks, a 9-channel UNet); inpainting models are not supported: "
                        "train on a base model",
    "dataset_class": "a user's own dataset class (package.module.Class); describe the data in a dataset TOML "
                     "(--dataset_config, docs/dataset_config.md)",
    "conditioning_data_dir": "a folder of mask images for a command-line dataset (ControlNet-style subfolders); set "
                             "conditioning_data_dir in each subset of a dataset TOML (--dataset_config) instead",
    "huggingface_repo_id": "uploads to the Hugging Face hub; nothing here goes online: upload the output yourself",
    "huggingface_token": "uploads to the Hugging Face hub; nothing here goes online",
    "save_state_to_huggingface": "uploads to the Hugging Face hub; nothing here goes online",
    "resume_from_huggingface": "resuming from the Hugging Face hub; download the state and pass --resume DIR",
    "async_upload": "uploads to the Hugging Face hub; nothing here goes online",
    "wandb_api_key": "a wandb login from the command line; run `wandb login` once instead (a key in a config file "
                     "leaks with it)",
}

NO_EFFECT = {  # flag -> (takes a value, why it does nothing here)
    "lowram": (False, "the models load straight into memory once"),
    "highvram": (False, "nothing is moved off the device to save memory in the first place"),
    "mem_eff_attn": (False, "attention runs through torch's scaled_dot_product_attention (memory-efficient) already"),
    "tokenizer_cache_dir": (True, "tokenizers come from the model folder or the bundled CLIP vocabulary; nothing is "
                                  "downloaded"),
    "disable_mmap_load_safetensors": (False, "checkpoints are read with safetensors' own (memory-mapped) loader"),
    "cache_info": (False, "the dataset's image sizes are read when it is built; nothing is cached for them"),
    "skip_cache_check": (False, "a cached latent file is checked for its bucket's size when it is read (its header only)"),
    "zero_stage": (True, "only used with --deepspeed, which APT-LoRA does not implement"),
    "offload_optimizer_device": (True, "only used with --deepspeed, which APT-LoRA does not implement"),
    "offload_optimizer_nvme_path": (True, "only used with --deepspeed, which APT-LoRA does not implement"),
    "offload_param_device": (True, "only used with --deepspeed, which APT-LoRA does not implement"),
    "offload_param_nvme_path": (True, "only used with --deepspeed, which APT-LoRA does not implement"),
    "zero3_init_flag": (False, "only used with --deepspeed, which APT-LoRA does not implement"),
    "zero3_save_16bit_model": (False, "only used with --deepspeed, which APT-LoRA does not implement"),
    "fp16_master_weights_and_gradients": (False, "only used with --deepspeed, which APT-LoRA does not implement"),
    "huggingface_repo_type": (True, "only used with --huggingface_repo_id, which APT-LoRA does not implement"),
    "huggingface_path_in_repo": (True, "only used with --huggingface_repo_id, which APT-LoRA does not implement"),
    "huggingface_repo_visibility": (True, "only used with --huggingface_repo_id, which APT-LoRA does not implement"),
    "ddp_gradient_as_bucket_view": (False, "this trainer all-reduces the LoRA's gradients itself, without a DDP "
                                           "wrapper"),
    "console_log_simple": (False, "the console log is plain text already"),
    "ddp_static_graph": (False, "this trainer all-reduces the LoRA's gradients itself, without a DDP wrapper"),
}


OTHER_NETWORK_MODULES = {  # --network_module -> what it trains; what to do here
    "lycoris.kohya": "LyCORIS (LoCon, LoHa, LoKr, ...); the nearest to its LoCon is this LoRA with 3x3 convs: "
                     "--network_module networks.lora --network_args conv_dim=N conv_alpha=A (the others are not implemented)",
    "networks.dylora": "DyLoRA (every rank up to --network_dim in one file); train the one rank you want with "
                       "networks.lora --network_dim N",
    "networks.lora_fa": "LoRA-FA (the down weights frozen); use networks.lora",
    "networks.oft": "OFT (orthogonal fine-tuning); use networks.lora",
    "networks.lora_interrogator": "not a trainer's network; use networks.lora",
}


def network_module_error(module: str) -> str:
    """The error for a --network_module other than networks.lora: what it is and what to do instead."""
    if module in OTHER_NETWORK_MODULES:
        what, todo = OTHER_NETWORK_MODULES[module].split("; ", 1)
        return f"--network_module {module}: APT-LoRA trains kohya's networks.lora only, not {what}: {todo}"
    return (f"--network_module {module}: APT-LoRA trains kohya's networks.lora only (SD1.x, SD2.x, SDXL): leave "
            f"--network_module out, or set it to networks.lora")


_OFF_TEXT = ("", "0", "0.0", "false", "none")


def asks_for_nothing(value, command_line: bool = False) -> bool:
    """Whether a flag's value leaves the feature off: false, 0, "" or an empty list in a TOML file (sd-scripts GUIs
    write every key, most at such a default), or `--flag 0` / `--flag ""` on the command line (where a bare
    `--flag`, no values, turns it on)."""
    if command_line:
        return bool(value) and all(str(v).strip().lower() in _OFF_TEXT for v in value)
    return value is None or value is False or value == [] or value == "" or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


class NotImplementedFlag(argparse.Action):
    """An sd-scripts flag this trainer does not implement: an error naming it and what to do instead, unless its
    value leaves it off (`asks_for_nothing`)."""

    def __init__(self, option_strings, dest, advice: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs="*", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.advice = advice

    def message(self) -> str:
        what, todo = self.advice.split("; ", 1)
        return f"is an sd-scripts flag that APT-LoRA does not implement ({what}): {todo}"

    def __call__(self, parser, namespace, values, option_string=None):
        if not asks_for_nothing(values, command_line=True):
            raise argparse.ArgumentError(self, self.message())


def add_to_parser(p: argparse.ArgumentParser) -> None:
    """Register the flags of both tables: the accepted ones in their own --help group, the others hidden."""
    g = p.add_argument_group("sd-scripts flags accepted without effect")
    for flag, (takes_value, why) in NO_EFFECT.items():
        kind = dict(nargs="*") if takes_value else dict(action="store_true")
        g.add_argument(f"--{flag}", default=argparse.SUPPRESS, help=f"no effect here: {why}", **kind)
    for flag, advice in NOT_IMPLEMENTED.items():
        p.add_argument(f"--{flag}", action=NotImplementedFlag, advice=advice)


def no_effect_notes(args) -> list[str]:
    """One line per accepted flag the run was given, saying why it changes nothing."""
    return [f"--{flag} has no effect here: {why}" for flag, (_, why) in NO_EFFECT.items()
            if hasattr(args, flag) and not asks_for_nothing(getattr(args, flag))]


def markdown_table() -> str:
    """The flags that fail, for docs/cli.md."""
    lines = ["## sd-scripts flags not implemented", "",
             "Given on the command line or in a `--config_file`, each is an error that says what to do instead, unless",
             "its value leaves it off (`false`, `0`, `\"\"`: sd-scripts GUIs write every key, most at such a default).",
             "",
             "| flag | in sd-scripts | here |", "|---|---|---|"]
    for flag, advice in NOT_IMPLEMENTED.items():
        what, todo = advice.split("; ", 1)
        lines.append(f"| `--{flag}` | {what} | {todo} |")
    return "\n".join(lines) + "\n"
