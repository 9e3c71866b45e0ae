"""The trainer's arguments checked and normalised before anything loads: a bad flag fails in a second with a
message that names it and says what to give, not after the model has loaded or hours into the run. The checks
run in the order below, so a run with several problems reports the first one a user would fix first."""
from __future__ import annotations

import logging
import os

from library.sd_scripts_flags import network_module_error, no_effect_notes
from library.train_util import TrainingSetupError, check_output_location

logger = logging.getLogger("apt_lora")


def verify_args(args) -> None:
    """Every check, in order; fills in what the flags imply (sd-scripts' aliases, `--cache_*_to_disk`, the
    output name, `--resume latest`)."""
    for check in (_required, _ranges, _combinations, _aliases, _optimizer, _dims_from_weights, _caches, _fast_paths,
                  _sampling, _resume):
        check(args)


def _required(args) -> None:
    """What a run cannot start without: a model, data and an output folder it may write to."""
    if not args.pretrained_model_name_or_path:
        raise TrainingSetupError("--pretrained_model_name_or_path is required: a diffusers folder or a .safetensors checkpoint")
    if args.dataset_config is None and args.train_data_dir is None:
        raise TrainingSetupError("no training data: pass --dataset_config data.toml (or --train_data_dir)")
    if args.debug_dataset_dir and not args.debug_dataset:
        raise TrainingSetupError("--debug_dataset_dir is where --debug_dataset writes the images: add --debug_dataset")
    if args.debug_dataset_dir and os.path.isdir(args.debug_dataset_dir) and os.listdir(args.debug_dataset_dir) \
            and not args.overwrite:
        raise TrainingSetupError(f"--debug_dataset_dir {args.debug_dataset_dir} is not empty: choose a new folder, "
                                 "or pass --overwrite to write over the images there")
    if not args.output_dir and not args.debug_dataset:  # --debug_dataset writes nothing there
        raise TrainingSetupError("--output_dir is required: the folder the LoRA is written to")
    if args.output_dir:
        check_output_location(args)  # before the model loads: a bad --output_name/--output_dir fails at once
    for note in no_effect_notes(args):
        logger.info(note)


def _ranges(args) -> None:
    """Values out of their range: each was a raw exception deep in the run, or did something else than asked (a
    negative --max_grad_norm or --min_snr_gamma flips the gradients' sign, --save_every_n_steps -1 saves at every
    step)."""
    off = " (0 turns it off)"
    bounds = {"gradient_accumulation_steps": (1, ""), "clip_skip": (1, ""), "max_data_loader_n_workers": (0, ""),
              "validate_every_n_epochs": (1, ""), "max_validation_steps": (1, ""),
              "save_every_n_steps": (0, off), "save_every_n_epochs": (0, off), "sample_every_n_steps": (0, off),
              "sample_every_n_epochs": (0, off), "validate_every_n_steps": (0, off), "max_grad_norm": (0, off),
              "max_train_epochs": (0, " (0: --max_train_steps counts)"), "max_bad_steps": (0, ""),
              "min_snr_gamma": (0, off), "lr_scheduler_power": (0, ""), "lr_scheduler_timescale": (1, ""),
              "lr_scheduler_num_cycles": (1, ""), "lr_scheduler_min_lr_ratio": (0, ""),
              "unet_cuda_graph_max": (1, ""), "initial_epoch": (1, " (1 is the first)"), "initial_step": (0, ""),
              **{f"save_last_n_{kind}{state}": (1, "") for kind in ("epochs", "steps") for state in ("", "_state")}}
    for flag, (low, hint) in bounds.items():
        value = getattr(args, flag)
        if value is not None and value < low:
            raise TrainingSetupError(f"--{flag} must be at least {low}{hint}, got {value}")
    if args.lr_scheduler_min_lr_ratio is not None and args.lr_scheduler_min_lr_ratio > 1:
        raise TrainingSetupError(f"--lr_scheduler_min_lr_ratio is the lowest learning rate as a fraction of "
                                 f"--learning_rate: give 0 to 1, got {args.lr_scheduler_min_lr_ratio}")
    if args.max_train_steps is not None and args.max_train_steps < 1 and not args.max_train_epochs:
        raise TrainingSetupError(f"--max_train_steps {args.max_train_steps}: nothing would train; give at least 1 "
                                 f"(or --max_train_epochs)")
    if args.seed is not None and not 0 <= args.seed < 2 ** 32:
        raise TrainingSetupError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}; leave it out for a random "
                                 f"seed (it is logged and saved in the LoRA's metadata)")


def _combinations(args) -> None:
    """Flags that need another flag, files they name, and values that turn the training off."""
    if (args.save_model_as or "safetensors").lower() != "safetensors":
        raise TrainingSetupError(
            f"--save_model_as {args.save_model_as}: LoRA files are written as .safetensors only (a .ckpt or .pt file "
            "is a pickle, which can carry code; ComfyUI, A1111/Forge, sd-scripts and diffusers all read "
            "safetensors): leave the flag out")
    for kind in ("epochs", "steps"):
        for flag in (f"save_last_n_{kind}", f"save_last_n_{kind}_state"):
            if getattr(args, flag) and not getattr(args, f"save_every_n_{kind}"):
                raise TrainingSetupError(f"--{flag} keeps the last of the saves that --save_every_n_{kind} makes: "
                                         f"add --save_every_n_{kind}")
        if getattr(args, f"save_last_n_{kind}_state") and not args.save_state:
            raise TrainingSetupError(f"--save_last_n_{kind}_state keeps training states: add --save_state")
    thumb = args.metadata_thumbnail
    if thumb and not thumb.startswith("data:") and not os.path.isfile(thumb):
        raise TrainingSetupError(f"--metadata_thumbnail {thumb}: no such image file (give an image, or a data: URL)")
    if args.ddp_timeout is not None and args.ddp_timeout < 1:
        raise TrainingSetupError(f"--ddp_timeout is in minutes and must be at least 1, got {args.ddp_timeout}")
    if (args.fp8_base or args.fp8_base_unet) and args.mixed_precision not in ("fp16", "bf16"):
        flag = "--fp8_base" if args.fp8_base else "--fp8_base_unet"
        raise TrainingSetupError(f"{flag} computes each layer in the --mixed_precision dtype: add --mixed_precision "
                                 f"bf16 (or fp16); it is {args.mixed_precision!r}")
    if args.network_multiplier == 0:
        raise TrainingSetupError("--network_multiplier 0 turns the LoRA off, so nothing would train: give it a non-zero "
                                 "value (1.0, the default, is the usual)")
    if args.full_bf16 and args.mixed_precision != "bf16":  # sd-scripts asserts the same
        raise TrainingSetupError(f"--full_bf16 keeps the LoRA in bf16 and needs --mixed_precision bf16; it is "
                                 f"{args.mixed_precision!r}")
    if args.network_module != "networks.lora":
        raise TrainingSetupError(network_module_error(args.network_module))


def _optimizer(args) -> None:
    """The optimizer's package and --optimizer_args' syntax, before the model loads: a missing bitsandbytes or
    prodigyopt was found after the model, the network and the latent cache (minutes for SDXL)."""
    from library.optimizers import parse_kv_args, resolve_optimizer

    resolve_optimizer(args)
    parse_kv_args(getattr(args, "optimizer_args", None), "--optimizer_args")


def _aliases(args) -> None:
    """sd-scripts' alternative spellings, as the one this trainer reads."""
    if args.use_8bit_adam:  # the name every later check reads (a disagreeing flag is refused there)
        from library.optimizers import optimizer_name

        args.optimizer_type = optimizer_name(args)
    if args.caption_extention is not None:  # sd-scripts: the misspelled flag, when given, wins
        args.caption_extension = args.caption_extention
    if isinstance(args.text_encoder_lr, list):  # one value for every text encoder, two for SDXL's TE1 and TE2
        args.text_encoder_lr = (args.text_encoder_lr[0] if len(args.text_encoder_lr) == 1
                                else args.text_encoder_lr or None)


def _dims_from_weights(args) -> None:
    """`--dim_from_weights`: the rank and alpha of the LoRA being continued."""
    if args.dim_from_weights:
        if not args.network_weights:
            raise TrainingSetupError("--dim_from_weights reads the rank from the LoRA being continued: give it with "
                                     "--network_weights FILE")
        from networks.lora import dims_from_weights

        given = [a.split("=", 1)[0].strip() for a in args.network_args or []]
        clash = [k for k in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas") if k in given]
        if clash:
            raise TrainingSetupError(f"--dim_from_weights takes every module's rank and alpha from the file: drop "
                                     f"{', '.join(clash)} from --network_args")
        dims = dims_from_weights(args.network_weights)
        if "network_dim" in dims:
            args.network_dim, args.network_alpha = dims["network_dim"], dims["network_alpha"]
        if "conv_dim" in dims:
            args.network_args = [a for a in args.network_args or [] if not a.startswith(("conv_dim=", "conv_alpha="))]
            args.network_args += [f"conv_dim={dims['conv_dim']}", f"conv_alpha={dims['conv_alpha']:g}"]
        ranks = sorted({r for r, _ in dims["modules"].values()})
        logger.info("--dim_from_weights: %s; each of its %d modules keeps its own rank (ranks in the file: %s)",
                    ", ".join(f"{k} {v:g}" for k, v in dims.items() if k != "modules"), len(dims["modules"]),
                    ", ".join(map(str, ranks)))


def _caches(args) -> None:
    """The cache flags and what they imply."""
    if args.cache_latents_to_disk:
        args.cache_latents = True
    if args.cache_text_encoder_outputs_to_disk:
        args.cache_text_encoder_outputs = True
    if args.cache_text_encoder_outputs and not args.network_train_unet_only:
        given = "_to_disk" if args.cache_text_encoder_outputs_to_disk else ""
        raise TrainingSetupError(f"--cache_text_encoder_outputs{given} needs --network_train_unet_only (a trained text "
                                 "encoder changes its outputs)")


def _fast_paths(args) -> None:
    """xformers, the CUDA graphs, `--apt_prior_ahead` and `--torch_compile`: what each needs."""
    if args.xformers:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise TrainingSetupError("--xformers needs the xformers package (CUDA only): pip install -r requirements-gpu.txt, "
                                     "or leave the flag out to use PyTorch SDPA attention") from None
    from library.unet_graph import GRAPH_FLAGS, blocker_message, graph_blockers

    graph_flags = [f for f in GRAPH_FLAGS if getattr(args, f)]  # LoRA dropout is checked once the network is built
    if graph_flags:
        import torch

        from apt_ext.step import apt_enabled

        for flag in graph_flags:
            reasons = graph_blockers(flag, cuda=torch.cuda.is_available(), apt_on=apt_enabled(args),
                                     gradient_checkpointing=args.gradient_checkpointing,
                                     trains_text_encoder=not args.network_train_unet_only,
                                     torch_compile=args.torch_compile)
            if reasons:
                raise TrainingSetupError(blocker_message(flag, reasons[0]))
    if args.apt_prior_ahead:
        from apt_ext.step import apt_enabled

        if not apt_enabled(args):
            raise TrainingSetupError("--apt_prior_ahead runs APT's prior pass a step ahead: it needs --apt (or "
                                     "--loss_type dco)")
    if args.torch_compile:
        import torch

        from library.torch_compile import backend_problem

        problem = backend_problem(args.dynamo_backend, cuda=torch.cuda.is_available())
        if problem:
            raise TrainingSetupError(problem)
        if args.gradient_checkpointing:  # the recomputation can pick another compiled graph (pytorch#166926)
            raise TrainingSetupError("--torch_compile cannot be combined with --gradient_checkpointing yet (the "
                                     "backward's recomputation can run another compiled graph than the forward): "
                                     "leave one of them out")


def _sampling(args) -> None:
    """Sampling, the output name and logging, checked before the model loads."""
    if args.sample_prompts:  # a sampler typo fails now, not at the first sample hours into the run
        from library.sampling import SamplingError, make_sampler

        try:
            make_sampler(args.sample_sampler)
        except SamplingError as e:
            raise TrainingSetupError(f"--sample_sampler: {e}") from None
    for flag in ("sample_every_n_steps", "sample_every_n_epochs"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:  # sd-scripts: a warning, then off
            logger.warning("--%s %d is not positive: sampling at intervals is off", flag, getattr(args, flag))
            setattr(args, flag, None)
    if args.sample_prior_grid and not args.sample_prompts:
        raise TrainingSetupError("--sample_prior_grid needs --sample_prompts FILE: the grid shows those prompts "
                                 "with the LoRA off and on")
    if args.output_name is None:
        args.output_name = "last"
    if args.logging_dir and args.log_with is None:
        args.log_with = "tensorboard"
    if args.log_tracker_config:  # a bad file fails now, not after the model has loaded
        from library.run_log import tracker_init_kwargs

        tracker_init_kwargs(args)
    if args.log_with in ("wandb", "all"):
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise TrainingSetupError(f"--log_with {args.log_with} needs the wandb package: pip install wandb, then "
                                     "`wandb login` (or set WANDB_MODE=offline); or use --log_with tensorboard")


def _resume(args) -> None:
    """`--resume` (`latest` found now) and sd-scripts' `--initial_step`/`--initial_epoch`."""
    if args.resume and (args.initial_step is not None or args.initial_epoch is not None):
        # the command an interrupted --initial_step run prints is its own plus --resume: the state knows its step
        logger.warning("--resume continues at the step its state was saved at: --initial_step/--initial_epoch are "
                       "ignored (they start a run without a state, e.g. from --network_weights)")
        args.initial_step = args.initial_epoch = None
    if args.resume == "latest":
        from library.interrupt import find_latest_state

        latest = find_latest_state(args.output_dir, args.output_name)
        if latest is None:
            raise TrainingSetupError(f"--resume latest: no saved state (<name>-state folder) in {args.output_dir}")
        logger.info("--resume latest: %s", latest)
        args.resume = latest
    if args.skip_until_initial_step and args.resume:
        logger.info("--skip_until_initial_step: --resume always continues the data where its state stopped")
    elif args.skip_until_initial_step and args.initial_step is None and args.initial_epoch is None:
        logger.warning("--skip_until_initial_step has no effect without --initial_step or --initial_epoch")
    if (args.initial_step or (args.initial_epoch or 1) > 1) and not args.network_weights:
        logger.warning("--initial_step/--initial_epoch start a new LoRA part-way through the run: to continue one, "
                       "pass it with --network_weights (or continue a saved state with --resume)")
    if args.resume and not os.path.isdir(args.resume):
        raise TrainingSetupError(f"--resume {args.resume}: no such folder (pass a <name>-step<N>-state folder written by --save_state)")
