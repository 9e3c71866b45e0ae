"""The command-line interface of train_apt_lora.py: sd-scripts' argument names and defaults.

Kept apart from the training loop so the loop reads top to bottom, and so tests and `--config_file`
validation can build the parser without importing the trainer.
"""
from __future__ import annotations

import argparse

from library import sd_scripts_flags
from library.config_util import RESIZE_INTERPOLATIONS
from library.optimizers import int_or_float


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="diffusers folder or single-file .safetensors checkpoint (SD1.x, SD2.x, SDXL)")
    g.add_argument("--v2", action="store_true", default=None, help="the model is SD2.x (detected from the file; this checks it)")
    g.add_argument("--sdxl", action="store_true", default=None, help="the model is SDXL (detected from the file; this checks it)")
    g.add_argument("--v_parameterization", action="store_true", default=None,
                   help="train with v-prediction (SD2.x 768-v); single-file checkpoints cannot tell")
    g.add_argument("--vae", type=str, default=None, help="replace the model's VAE (.safetensors or diffusers folder)")
    g.add_argument("--tokenizer_path", type=str, default=None,
                   help="folder with CLIP tokenizer files; default: the model folder, else the bundled vocabulary")
    g.add_argument("--allow_pickle_checkpoint", action="store_true",
                   help="allow .ckpt/.pt checkpoints (loaded with torch.load(weights_only=True)); prefer .safetensors")
    g.add_argument("--clip_skip", type=int, default=None, help="use the output of the k-th last text-encoder layer (SD1/SD2)")
    g.add_argument("--max_token_length", type=int, default=None, choices=[None, 75, 150, 225],
                   help="captions longer than 75 tokens: 150 or 225")


def _network_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA network")
    g.add_argument("--network_module", type=str, default="networks.lora",
                   help="networks.lora only (LoCon-style 3x3 convs: --network_args conv_dim=N); lycoris.kohya, "
                        "networks.dylora and the like are errors that say what to do instead")
    g.add_argument("--network_dim", type=int, default=None, help="LoRA rank (default 4)")
    g.add_argument("--network_alpha", type=float, default=1.0, help="LoRA alpha; scale = alpha / rank (default 1)")
    g.add_argument("--network_dropout", type=float, default=None, help="dropout on the LoRA down output (training only)")
    g.add_argument("--network_args", type=str, default=None, nargs="*",
                   help='extra "key=value" options: conv_dim, conv_alpha, rank_dropout, module_dropout; LoRA+: '
                        'loraplus_lr_ratio (e.g. 16: the up weights learn 16x faster), loraplus_unet_lr_ratio, '
                        'loraplus_text_encoder_lr_ratio')
    g.add_argument("--network_weights", type=str, default=None, help="continue training from this LoRA .safetensors")
    g.add_argument("--base_weights", type=str, nargs="*", default=None,
                   help="LoRA .safetensors files merged into the base model before training (the new LoRA learns on "
                        "top of them; use it together with them)")
    g.add_argument("--base_weights_multiplier", type=float, nargs="*", default=None,
                   help="one multiplier per --base_weights file (default 1.0)")
    g.add_argument("--dim_from_weights", action="store_true",
                   help="build each LoRA module at the rank and alpha it has in the --network_weights file (per-module ranks kept)")
    g.add_argument("--network_train_unet_only", action="store_true", help="train the UNet LoRA only (no text encoder LoRA)")
    g.add_argument("--network_train_text_encoder_only", action="store_true",
                   help="train the text encoders' LoRA only (no UNet LoRA)")
    g.add_argument("--network_multiplier", type=float, default=1.0, help="LoRA multiplier during training")
    g.add_argument("--no_fused_lora", action="store_true",
                   help="compute each Linear LoRA branch as separate down, up, scale and add ops instead of down + one "
                        "addmm (same result to rounding, more kernel launches; docs/speed.md)")


def _dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset (CLI fallback of the dataset TOML)")
    g.add_argument("--dataset_config", type=str, default=None, help="sd-scripts dataset TOML")
    g.add_argument("--train_data_dir", type=str, default=None, help="folder of <repeats>_<class tokens> subfolders")
    g.add_argument("--reg_data_dir", type=str, default=None, help="regularization images, same layout")
    g.add_argument("--in_json", type=str, default=None, help="fine-tuning metadata (ignored with --dataset_config)")
    g.add_argument("--resolution", type=str, default=None, help='"512" or "768,512" (width,height)')
    g.add_argument("--skip_image_resolution", type=str, default=None,
                   help='"512" or "768,512": leave out images whose original area (width x height) is at most this '
                        "one's, e.g. the low-resolution sources of a folder shared by datasets of several "
                        "resolutions (the `skip_image_resolution` dataset key sets it per dataset)")
    g.add_argument("--train_batch_size", type=int, default=1)
    g.add_argument("--dataset_repeats", type=int, default=1)
    g.add_argument("--enable_bucket", action="store_true")
    g.add_argument("--min_bucket_reso", type=int, default=256)
    g.add_argument("--max_bucket_reso", type=int, default=1024)
    g.add_argument("--bucket_reso_steps", type=int, default=64)
    g.add_argument("--bucket_no_upscale", action="store_true")
    g.add_argument("--caption_extension", type=str, default=".caption")
    g.add_argument("--caption_extention", type=str, default=None, help="sd-scripts' old misspelling of --caption_extension")
    g.add_argument("--shuffle_caption", action="store_true")
    g.add_argument("--keep_tokens", type=int, default=0)
    g.add_argument("--caption_dropout_rate", type=float, default=0.0)
    g.add_argument("--caption_dropout_every_n_epochs", type=int, default=0)
    g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0)
    g.add_argument("--token_warmup_step", type=float, default=0,
                   help="caption token warm-up: over this many optimizer steps (below 1: this fraction of the run) "
                        "the captions grow from --token_warmup_min tags to all, in caption order; 0 is off")
    g.add_argument("--token_warmup_min", type=int, default=1,
                   help="tags (after --keep_tokens) of each caption at the first step of the token warm-up")
    g.add_argument("--caption_separator", type=str, default=None, help='separator of caption tags (default ",")')
    g.add_argument("--keep_tokens_separator", type=str, default=None,
                   help="tags before this separator are never shuffled or dropped (instead of --keep_tokens)")
    g.add_argument("--secondary_separator", type=str, default=None,
                   help="joins tags kept together through shuffling and dropout; replaced by the separator after")
    g.add_argument("--enable_wildcard", action="store_true", help="{a|b|c} in a caption picks one at random")
    g.add_argument("--caption_prefix", type=str, default=None, help="text put before every caption")
    g.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    g.add_argument("--flip_aug", action="store_true")
    g.add_argument("--random_crop", action="store_true")
    g.add_argument("--face_crop_aug_range", type=str, default=None,
                   help="MIN,MAX without bucketing: crop around the face named in the file name (<name>_<cx>_<cy>_<w>_"
                        "<h>, sd-scripts' tools/detect_face_rotate.py) with the crop's side MIN to MAX times the "
                        "face's size, e.g. 2.0,4.0")
    g.add_argument("--color_aug", action="store_true",
                   help="a small random hue or gamma change of a third of the images each step (not with --cache_latents)")
    g.add_argument("--alpha_mask", action="store_true",
                   help="weight the loss by each image's alpha channel (transparent pixels out of the loss); the "
                        "subset key alpha_mask, for every subset")
    g.add_argument("--resize_interpolation", type=str, default=None, choices=list(RESIZE_INTERPOLATIONS),
                   help="resampling filter for resizing images (default: area when shrinking, lanczos when enlarging)")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images")
    g.add_argument("--validation_split", type=float, default=None,
                   help="hold out this fraction of each subset's images (not reg images) for a validation loss "
                        "(also a dataset key); docs/usage.md, 'Validation'")
    g.add_argument("--validation_seed", type=int, default=None,
                   help="seed of the split and of the validation noise (default: --seed)")
    g.add_argument("--validate_every_n_steps", type=int, default=None, help="validate after every N optimizer steps")
    g.add_argument("--validate_every_n_epochs", type=int, default=None,
                   help="validate after every N epochs (default: every epoch, when there is a validation split)")
    g.add_argument("--max_validation_steps", type=int, default=None,
                   help="validate on at most N held-out batches (default: all)")
    g.add_argument("--max_image_pixels", type=int, default=None,
                   help="refuse images with more pixels than this (decompression bombs; default 178956970)")
    g.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="DataLoader worker processes (0: load in the main process). Default: 4 persistent ones "
                        "(at most the cores less one) on CUDA without --cache_latents, else 0")
    g.add_argument("--persistent_data_loader_workers", action="store_true")
    g.add_argument("--cache_latents", action="store_true", help="encode every image once before training (in memory)")
    g.add_argument("--cache_latents_to_disk", action="store_true", help="cache latents in <image>_<W>x<H>_<hash>_sd.safetensors files beside the images (the hash: resize, flip and mask settings)")
    g.add_argument("--vae_batch_size", type=int, default=1)
    g.add_argument("--cache_text_encoder_outputs", action="store_true",
                   help="encode each caption once, as processed (prefix, suffix, wildcard pick, dropout); needs "
                        "--network_train_unet_only, and refuses shuffle_caption and caption_tag_dropout_rate, "
                        "whose captions rarely repeat")
    g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                   help="sd-scripts' disk cache of them: implies --cache_text_encoder_outputs, kept in memory here "
                        "(a dataset's captions take little)")


def _training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--max_train_steps", type=int, default=1600)
    g.add_argument("--max_train_epochs", type=int, default=None, help="overrides --max_train_steps")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    g.add_argument("--weighted_captions", action="store_true",
                   help="read A1111 attention in captions: (word) x1.1, [word] /1.1, (word:1.3); the text encoders' "
                        "output at those tokens is scaled, as in sd-scripts (\\( for a literal bracket)")
    g.add_argument("--debug_dataset", action="store_true",
                   help="print every batch of the first epoch (bucket, crop, processed caption and, with --apt, the "
                        "class prompt c) and exit without training; --output_dir is not needed")
    g.add_argument("--debug_dataset_dir", type=str, default=None,
                   help="with --debug_dataset: also write each image as the trainer gets it (resized, cropped, "
                        "flipped) as PNG files into this new (or empty) folder")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under mixed precision")
    g.add_argument("--fp8_base", action="store_true",
                   help="store the frozen UNet's and text encoders' Linear/Conv2d weights in float8_e4m3fn (half the "
                        "memory of bf16 weights; each layer computes in --mixed_precision, which must be fp16 or bf16; "
                        "slower: one cast per layer per pass)")
    g.add_argument("--fp8_base_unet", action="store_true",
                   help="as --fp8_base for the UNet only; the text encoders keep --mixed_precision weights")
    g.add_argument("--full_bf16", action="store_true",
                   help="keep the LoRA weights, gradients and optimizer states in bf16 too (sd-scripts' flag; needs "
                        "--mixed_precision bf16): half their memory, but updates smaller than bf16 can resolve are lost")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--ddp_timeout", type=int, default=None,
                   help="minutes the processes of `accelerate launch` wait for each other (default: torch's, 30 for NCCL)")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--channels_last", action="store_true",
                   help="UNet weights in channels_last memory layout (NHWC convolutions; may help on GPUs with tensor "
                        "cores, measure with bench/apt_overhead.py; same results up to rounding)")
    g.add_argument("--cuda_graphs", choices=["off", "auto"], default="off",
                   help="auto: turn on each of --unet_cuda_graph, --text_encoder_cuda_graph and --apt_cuda_graph that "
                        "this run can use (CUDA, no LoRA dropout, no gradient checkpointing; the run prints which, and "
                        "why not the others). Off by default until the graphs' equality check passes on a GPU "
                        "(docs/speed.md); on CPU auto does nothing")
    g.add_argument("--defer_step_read", choices=["auto", "on", "off"], default="auto",
                   help="auto (default): on CUDA with a fused optimizer (AdamW's default there), a NaN/inf update is "
                        "dropped on the device and each step's loss is read one step later, so the host never waits "
                        "for the GPU; a dropped update then still counts as a step. off: one read at each step's end, "
                        "and a dropped step does not count. on: also on the CPU (with --optimizer_args fused=True)")
    g.add_argument("--unet_cuda_graph", action="store_true",
                   help="replay the UNet's training forward and backward as CUDA graphs, one pair per bucket shape and "
                        "batch size: far fewer kernel launches, an SDXL step 6.8x faster on an H200 (CUDA only; no LoRA "
                        "dropout, no gradient checkpointing; off by default until its equality check passes on a GPU, "
                        "see docs/speed.md)")
    g.add_argument("--unet_cuda_graph_max", type=int, default=2,
                   help="--unet_cuda_graph (and --text_encoder_cuda_graph) records at most this many input shapes (each "
                        "holds its activations in GPU memory, and one is recorded only while twice the largest so far "
                        "is still free); other shapes run without a graph")
    g.add_argument("--text_encoder_cuda_graph", action="store_true",
                   help="replay the text encoders' training forward and backward as CUDA graphs when their LoRA "
                        "trains (one pair per batch size): ~5800 fewer kernel launches per SDXL step (CUDA only; no "
                        "LoRA dropout, no gradient checkpointing; not yet run on a GPU, see docs/speed.md)")
    g.add_argument("--torch_compile", action="store_true",
                   help="compile the UNet's repeated blocks (ResnetBlock2D, BasicTransformerBlock) with torch.compile: "
                        "the first steps of each bucket shape compile (minutes for SDXL), later ones reuse the graphs; "
                        "the run prints how many graphs and how long (docs/speed.md). Not with the CUDA graph flags or "
                        "--gradient_checkpointing")
    g.add_argument("--dynamo_backend", type=str, default="inductor",
                   help="torch.compile backend for --torch_compile (inductor, refused on the CPU where it computes wrong "
                        "LoRA gradients with torch 2.13; aot_eager and eager trace without generating code)")
    g.add_argument("--xformers", action="store_true", help="xformers attention (CUDA; requirements-gpu.txt)")
    g.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 disables")
    g.add_argument("--scale_weight_norms", type=float, default=None,
                   help="after each step, scale every LoRA down whose weight change ΔW has a norm above this "
                        "(max-norm regularisation, sd-scripts'; 1 is a common value; logged as max_norm/*)")
    g.add_argument("--max_bad_steps", type=int, default=10,
                   help="steps with a NaN/inf loss or gradient are skipped; after this many the run stops")
    g.add_argument("--noise_offset", type=float, default=None)
    g.add_argument("--noise_offset_random_strength", action="store_true")
    g.add_argument("--adaptive_noise_scale", type=float, default=None)
    g.add_argument("--multires_noise_iterations", type=int, default=None,
                   help="multires (pyramid) noise, as sd-scripts; its per-level scale factors are drawn from torch's "
                        "generator (sd-scripts: Python's random), so the same seed gives other noise than there")
    g.add_argument("--multires_noise_discount", type=float, default=0.3)
    g.add_argument("--ip_noise_gamma", type=float, default=None)
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true")
    g.add_argument("--min_timestep", type=int, default=None)
    g.add_argument("--max_timestep", type=int, default=None)
    g.add_argument("--min_snr_gamma", type=float, default=None, help="min-SNR weighting (5 is the paper's value)")
    g.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true")
    g.add_argument("--v_pred_like_loss", type=float, default=None)
    g.add_argument("--debiased_estimation_loss", action="store_true")
    g.add_argument("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1", "dco"],
                   help="dco: the DCO baseline (Lee et al. 2024), reference = LoRA off with the class prompt")
    g.add_argument("--dco_beta", type=float, default=1000.0, help="β of the DCO loss")
    g.add_argument("--masked_loss", action="store_true",
                   help="weight the loss by masks: the mask images of conditioning_data_dir subsets (read only with "
                        "this flag), and the alpha masks of alpha_mask subsets (which weight it whenever set, as in "
                        "sd-scripts); this flag checks that some subset has one")
    g.add_argument("--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"])
    g.add_argument("--huber_c", type=float, default=0.1)
    g.add_argument("--huber_scale", type=float, default=1.0)
    g.add_argument("--zero_terminal_snr", action="store_true",
                   help="rescale the noise schedule to zero terminal SNR (for v-prediction); as in sd-scripts, the "
                        "SNR loss weights (--min_snr_gamma, --debiased_estimation_loss, ...) keep the schedule from "
                        "before the rescale")


def _optimizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--optimizer_type", type=str, default="AdamW", help="AdamW, AdamW8bit (bitsandbytes), SGDNesterov, Adafactor; sd-scripts' Lion, Prodigy, "
                        "DAdapt*, Paged*, *ScheduleFree when their package is installed; a torch.optim name or "
                        "module.Class")
    g.add_argument("--optimizer_args", type=str, default=None, nargs="*", help='"key=value" optimizer options')
    g.add_argument("--use_8bit_adam", action="store_true", help="legacy alias of --optimizer_type AdamW8bit")
    g.add_argument("--use_lion_optimizer", action="store_true", help="legacy alias of --optimizer_type Lion")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--unet_lr", type=float, default=None)
    g.add_argument("--text_encoder_lr", type=float, default=None, nargs="*",
                   help="one value, or two for SDXL's text encoders (TE1, TE2)")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, "
                        "piecewise_constant, cosine_with_min_lr, warmup_stable_decay, inverse_sqrt, adafactor")
    g.add_argument("--lr_warmup_steps", type=int_or_float, default=0, help='steps, a ratio < 1 of the total, or "N%%"')
    g.add_argument("--lr_decay_steps", type=int_or_float, default=None,
                   help='warmup_stable_decay: steps of the decay, a ratio < 1 of the total, or "N%%"')
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1)
    g.add_argument("--lr_scheduler_power", type=float, default=1.0)
    g.add_argument("--lr_scheduler_timescale", type=int, default=None, help="inverse_sqrt's timescale (steps)")
    g.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                   help="cosine_with_min_lr and warmup_stable_decay: the lowest lr as a fraction of the lr")
    g.add_argument("--lr_scheduler_type", type=str, default=None,
                   help="any scheduler class (torch.optim.lr_scheduler name or module.Class), built with "
                        "--lr_scheduler_args; replaces --lr_scheduler")
    g.add_argument("--lr_scheduler_args", type=str, default=None, nargs="*",
                   help='"key=value" arguments of the schedule (Python literals, e.g. step_rules="1:10,0.1")')


def _saving_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("saving")
    g.add_argument("--output_dir", type=str, default=None, help="where LoRA files are written")
    g.add_argument("--output_name", type=str, default=None, help='file name stem (default "last")')
    g.add_argument("--save_model_as", type=str, default="safetensors",
                   help="safetensors (sd-scripts' ckpt and pt, pickle files, are refused with the reason)")
    g.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    g.add_argument("--save_every_n_epochs", type=int, default=None)
    g.add_argument("--save_every_n_steps", type=int, default=None)
    g.add_argument("--save_n_epoch_ratio", type=int, default=None,
                   help="save about N LoRAs over the run (every floor(epochs / N) epochs; sets --save_every_n_epochs)")
    g.add_argument("--save_last_n_epochs", type=int, default=None,
                   help="keep only the last N epoch saves (with --save_every_n_epochs); older ones are deleted")
    g.add_argument("--save_last_n_steps", type=int, default=None,
                   help="keep only the step saves of the last N steps (with --save_every_n_steps); older ones are "
                        "deleted")
    g.add_argument("--overwrite", action="store_true", help="allow replacing existing output files")
    g.add_argument("--no_metadata", action="store_true", help="write only the minimal metadata")
    g.add_argument("--training_comment", type=str, default=None)
    for key in ("title", "author", "description", "license", "tags", "usage_hint", "merged_from", "trigger_phrase",
                "preprocessor", "is_negative_embedding"):
        g.add_argument(f"--metadata_{key}", type=str, default=None, help=f"modelspec.{key} in the LoRA's metadata")
    g.add_argument("--metadata_thumbnail", type=str, default=None,
                   help="an image file (or a data: URL) stored as modelspec.thumbnail")


def _logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging and samples")
    g.add_argument("--logging_dir", type=str, default=None, help="TensorBoard logs go to <logging_dir>/<log_prefix><time>")
    g.add_argument("--log_prefix", type=str, default=None)
    g.add_argument("--log_with", type=str, default=None, choices=[None, "tensorboard", "wandb", "all"],
                   help="tensorboard (default with --logging_dir), wandb (needs the wandb package and a login), or all")
    g.add_argument("--log_tracker_name", type=str, default=None, help='the project name (default "network_train")')
    g.add_argument("--wandb_run_name", type=str, default=None, help="the wandb run's name (default: wandb picks one)")
    g.add_argument("--log_config", action="store_true",
                   help="also log the run's arguments to the trackers, without paths and secrets (as sd-scripts; "
                        "wandb sends them to its servers)")
    g.add_argument("--log_tracker_config", type=str, default=None,
                   help="a TOML file of tracker settings passed to the trackers' init, one table per tracker "
                        "(e.g. [wandb] entity = \"me\" tags = [\"apt\"])")
    g.add_argument("--console_log_level", type=str.upper, default=None,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="the log level (default INFO)")
    g.add_argument("--console_log_file", type=str, default=None,
                   help="also write the log to this file (appended to, never replaced)")
    g.add_argument("--sample_prompts", type=str, default=None, help="sd-scripts prompt file (.txt/.toml/.json)")
    g.add_argument("--sample_every_n_steps", type=int, default=None)
    g.add_argument("--sample_every_n_epochs", type=int, default=None)
    g.add_argument("--sample_at_first", action="store_true")
    g.add_argument("--sample_sampler", type=str, default="ddim")
    g.add_argument("--sample_prior_grid", action="store_true",
                   help="at the end, write OUTPUT_NAME_grid.png: every sample prompt with the LoRA off (the prior) "
                        "and on, at the same seeds")


def _floats(text: str) -> list[float]:
    """argparse type for "1,3" or "1 3"."""
    try:
        return [float(x) for x in str(text).replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers like 1,3") from None


def _apt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("APT (Adaptive Personalized Training); see docs/apt.md")
    g.add_argument("--apt", action="store_true", help="turn APT on: all of --apt_components")
    g.add_argument("--apt_components", type=str, default="ata,rs,aa",
                   help="with --apt, the components to use: ata (adaptive augmentation and loss weight), "
                        "rs (representation stabilization), aa (attention alignment); any comma-separated subset, "
                        "or none: monitor only (indicator and γ heatmap, plain DreamBooth training)")
    g.add_argument("--apt_preset", type=str, default=None, choices=[None, "sdxl", "sd2", "sd1"],
                   help="the paper's settings (implies --apt): temperature, rank 32 / alpha 32, lr 5e-5 (UNet) and "
                        "5e-6 (text encoder), AdamW; for the arguments not given (on the command line or in "
                        "--config_file, whatever their value)")
    g.add_argument("--apt_gamma_temperature", type=float, default=None,
                   help="temperature of the overfitting indicator (default 1000 for SDXL, 100 for SD1/SD2)")
    g.add_argument("--apt_ema_alpha", type=float, default=0.1, help="EMA rate of the per-bin losses")
    g.add_argument("--apt_num_bins", type=int, default=10, help="timestep bins of the indicator")
    g.add_argument("--apt_aug_p_max", type=float, default=0.8, help="cap of the augmentation probability")
    g.add_argument("--apt_aug_scale", type=_floats, default=[1.0, 3.0], help="zoom-out factor range, e.g. 1,3")
    g.add_argument("--apt_aug_rotation", type=float, default=15.0, help="rotation range in degrees (+-)")
    g.add_argument("--apt_aug_space", type=str, default="auto", choices=["auto", "pixel", "latent"],
                   help="augment images before the VAE (pixel) or cached latents (latent); auto picks by --cache_latents")
    g.add_argument("--apt_lambda_dist", type=float, default=30.0, help="weight of L_mu + L_sigma")
    g.add_argument("--apt_lambda_attn", type=float, default=3e-4, help="weight of L_attn")
    g.add_argument("--apt_layers", type=str, nargs="*", default=None,
                   help="UNet blocks for rs/aa (default: the two highest-resolution up blocks with attention)")
    g.add_argument("--apt_rs_hook", type=str, default="attn1", choices=["attn1", "transformer"],
                   help="hidden state of representation stabilization: attn1 outputs or Transformer2DModel outputs")
    g.add_argument("--apt_rs_stats", type=str, default="scalar", choices=["scalar", "per_channel"])
    g.add_argument("--apt_identifier_align", type=str, default="class", choices=["class", "drop"],
                   help="attention alignment of the identifier's column: to the class token (class) or left out (drop)")
    g.add_argument("--apt_cuda_graph", action="store_true",
                   help="replay the prior pass (base UNet, no grad) as a CUDA graph, one per bucket shape: fewer kernel "
                        "launches, same results (CUDA only; with --unet_cuda_graph an SDXL APT step 5.2x faster on an "
                        "H200; off by default until its equality check passes on a GPU, see docs/speed.md)")
    g.add_argument("--apt_prior_ahead", action="store_true",
                   help="queue the next step's inputs and prior pass before this step's backward, on a second CUDA "
                        "stream, so that the GPU can run both at once; the same results bit for bit (on the CPU it "
                        "only changes the order). Off by default until measured on a GPU (docs/speed.md)")


def _state_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training state and resume")
    g.add_argument("--save_state", action="store_true",
                   help="with every LoRA save, also save the training state (<name>-step<N>-state folder) for --resume")
    g.add_argument("--save_state_on_train_end", action="store_true",
                   help="save the training state with the final LoRA only (<name>-state)")
    g.add_argument("--save_last_n_epochs_state", type=int, default=None,
                   help="keep the states of the last N epoch saves (default: --save_last_n_epochs)")
    g.add_argument("--save_last_n_steps_state", type=int, default=None,
                   help="keep the states of the saves of the last N steps (default: --save_last_n_steps)")
    g.add_argument("--resume", type=str, default=None,
                   help='continue exactly from a saved state folder; "latest": the newest one in --output_dir')
    g.add_argument("--initial_epoch", type=int, default=None,
                   help="without a saved state, start counting at this epoch (1 = the first): continue a LoRA given "
                        "by --network_weights in the same numbering and learning-rate schedule (sd-scripts)")
    g.add_argument("--initial_step", type=int, default=None,
                   help="the same at this optimizer step (0 = the first); wins over --initial_epoch")
    g.add_argument("--skip_until_initial_step", action="store_true",
                   help="with --initial_step/--initial_epoch: skip the batches the earlier run trained on, so the "
                        "run sees the data it would have seen uninterrupted (otherwise the epoch starts at its first "
                        "batch)")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_apt_lora.py",
        description="Train a kohya-format LoRA for SD1.x / SD2.x / SDXL (sd-scripts compatible arguments).",
    )
    p.add_argument("--config_file", type=str, default=None, help="TOML file of arguments (CLI > TOML > defaults)")
    p.add_argument("--output_config", action="store_true", help="write the non-default arguments to --config_file and exit")
    for add in (_model_args, _network_args, _dataset_args, _training_args, _optimizer_args, _apt_args, _saving_args,
                _state_args, _logging_args, sd_scripts_flags.add_to_parser):
        add(p)
    return p


def markdown_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The CLI/TOML reference (docs/cli.md), generated from the parser so it cannot drift."""
    parser = parser or setup_parser()
    out = ["# train_apt_lora.py arguments", "",
           "Every argument can be given on the command line (`--name value`) or as `name = value` in the TOML",
           "file passed with `--config_file` (tables are flattened, so section names do not matter). Precedence:",
           "command line > TOML > default. Generated by `python -m library.train_args > docs/cli.md`.", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.option_strings and a.dest != "help" and a.help != argparse.SUPPRESS]
        if not actions:
            continue
        out += [f"## {'general' if group.title == 'options' else group.title}", "", "| argument | default | meaning |", "|---|---|---|"]
        for a in actions:
            default = "" if a.default in (None, argparse.SUPPRESS) or isinstance(a, argparse._StoreTrueAction) and not a.default else f"`{a.default}`"
            kind = "flag" if isinstance(a, argparse._StoreTrueAction) else (a.type.__name__ if a.type else "str")
            if a.nargs == "*":
                kind = f"list of {kind}"
            if a.choices:
                kind += ": " + ", ".join(str(c) for c in a.choices if c is not None)
            help_text = (a.help or "").replace("%%", "%").replace("|", "\\|")
            out.append(f"| `{a.option_strings[0]}` ({kind}) | {default} | {help_text} |")
        out.append("")
    return "\n".join(out) + "\n" + sd_scripts_flags.markdown_table()


if __name__ == "__main__":
    print(markdown_reference(), end="")
