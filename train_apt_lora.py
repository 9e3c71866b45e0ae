#!/usr/bin/env python
"""Train a kohya-format LoRA for SD1.x / SD2.x / SDXL, sd-scripts style.

    python train_apt_lora.py --pretrained_model_name_or_path MODEL --dataset_config data.toml \
        --output_dir out --output_name my_lora --network_dim 16 --max_train_steps 1000

Reads top to bottom: parse arguments, load the model and data, build the LoRA, then the loop.
One training step lives in `training_step` below: the plain DreamBooth-LoRA loss, or with `--apt`
(and for the DCO baseline) `apt_ext.step.apt_step`.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import sys
import time
from typing import TYPE_CHECKING, NamedTuple, Optional

# Never reach the HF hub: every model part and tokenizer comes from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library.train_args import setup_parser  # noqa: E402

if TYPE_CHECKING:
    from library.step_read import WindowRead

logger = logging.getLogger("apt_lora")


def training_step(args, ctx, batch):
    """The loss of one micro-batch. Returns (loss, logs)."""
    if ctx.apt is not None:
        from apt_ext.step import apt_step

        return apt_step(args, ctx, batch, ctx.apt)
    return plain_step(args, ctx, batch)


def plain_step(args, ctx, batch):
    """Plain DreamBooth-LoRA loss (sd-scripts' train_network step)."""
    from library.losses import get_huber_c, per_sample_loss, post_process_loss
    from library.noise import get_noise_noisy_latents_and_timesteps, get_target
    from library.conditioning import sdxl_time_ids

    model, accelerator = ctx.model, ctx.accelerator
    device, weight_dtype = accelerator.device, ctx.weight_dtype
    batch = ctx.batch_to_device(batch)

    latents = ctx.encode_latents(batch)
    noise, noisy_latents, timesteps = get_noise_noisy_latents_and_timesteps(args, model.noise_scheduler, latents)
    cond = ctx.encode_text(batch["captions"])
    time_ids = None
    if model.is_sdxl:
        time_ids = sdxl_time_ids(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]).to(device)

    pred, _ = ctx.unet_pass(noisy_latents.to(weight_dtype), timesteps, cond, time_ids)
    target = get_target(model.noise_scheduler, latents, noise, timesteps)

    huber_c = get_huber_c(args, timesteps, model.noise_scheduler)
    loss = per_sample_loss(pred.float(), target.float(), args.loss_type, huber_c, mask=batch.get("alpha_masks"))
    loss = loss * batch["loss_weights"].to(device)
    loss = post_process_loss(loss, args, timesteps, model.noise_scheduler)
    return loss.mean(), {}


class MicroBatch(NamedTuple):
    """What `micro_batch` returns. `read`: at the end of an accumulation window, what it reads back."""

    loss: object  # the micro-batch's loss, a 0-d tensor on the device
    logs: dict
    status: str  # "accumulating" | "stepped" | "skipped" | "queued" (--defer_step_read: decided on the device)
    read: Optional[WindowRead] = None

    @property
    def values(self) -> Optional[dict]:
        """The window's host floats when it has been read (stepped or skipped), else None."""
        return self.read.values if self.status in ("stepped", "skipped") else None


def micro_batch(args, ctx, batch, optimizer, lr_scheduler, trainable, step_fn=None, read=()) -> MicroBatch:
    """The loop body for one micro-batch: loss, backward, and at the end of an accumulation window the
    gradient all-reduce, clipping and the optimizer step. A NaN/inf loss or gradient drops the window's update
    on every process. `read`: names of logs to read back with the loss at the window's end (True: all).
    Nothing is read back from the device before the window's end (a non-finite loss is kept as a device flag and
    its backward runs: its gradients are dropped with the window). There, with `ctx.defer_read`
    (--defer_step_read), the optimizer skips a bad update on the device (torch's `found_inf`, as GradScaler uses
    with fused optimizers) and the read waits for the caller ("queued"); otherwise one read decides the step
    ("stepped" or "skipped"), so the host never waits for the optimizer step it queues.
    The benchmarks call this too, so what they time is what the trainer runs."""
    import torch

    from library.distributed import all_reduce_gradients, every_rank
    from library.optimizers import inner_optimizer
    from library.step_read import WindowRead

    accelerator = ctx.accelerator
    window = None
    with accelerator.accumulate(ctx.network):
        loss, logs = (step_fn or training_step)(args, ctx, batch)
        ctx.window_losses.append(loss.detach())
        ctx.window_keys.extend(batch["image_keys"])
        accelerator.backward(loss)
        status = "accumulating"
        if accelerator.sync_gradients:
            finite = torch.isfinite(torch.stack(ctx.window_losses)).all()
            ok = finite
            if accelerator.scaler is None:
                all_reduce_gradients(trainable, accelerator)  # then the norm is the same on every rank
                norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm or float("inf"))
                ok = finite & torch.isfinite(norm)
            shown = {k: logs[k] for k in (logs if read is True else read) if k in logs}
            if getattr(ctx, "defer_read", False):
                ok_everywhere = every_rank(ok, accelerator)
                window = WindowRead(finite, ok, loss, shown, ctx.window_keys, ok_everywhere)
                if accelerator.scaler is None:
                    inner_optimizer(optimizer).found_inf = (~ok_everywhere).float()  # the fused skip
                else:  # fp16: GradScaler finds overflowing gradients as it unscales, and hands the fused optimizer
                    # its found_inf itself; a non-finite loss anywhere makes every gradient NaN, so it skips that too
                    grads = [p.grad for p in trainable if p.grad is not None]
                    if grads:
                        torch._foreach_mul_(grads, torch.where(ok_everywhere, 1.0, float("nan")))
                    all_reduce_gradients(trainable, accelerator)
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm or float("inf"))  # unscales
                optimizer.step()
                lr_scheduler.step()  # a dropped update still counts as a step (as GradScaler's skips do)
                scale_weight_norms(args, ctx, window)
                status = "queued"
            else:
                window = WindowRead(finite, ok, loss, shown, ctx.window_keys)
                bad = window.decide(accelerator)
                if not bad and accelerator.scaler is not None:  # fp16: a window with a NaN loss is never unscaled;
                    all_reduce_gradients(trainable, accelerator)  # the scaler skips overflowing steps itself
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm or float("inf"))  # unscales
                if not bad:
                    optimizer.step()
                    if not getattr(optimizer, "step_was_skipped", False):  # fp16, an optimizer without found_inf:
                        lr_scheduler.step()  # GradScaler skipped it on the host; the schedule waits (accelerate's)
                    scale_weight_norms(args, ctx, window)
                status = "skipped" if bad else "stepped"
            ctx.window_losses, ctx.window_keys = [], []
        optimizer.zero_grad(set_to_none=not ctx.keep_grads)
    return MicroBatch(loss, logs, status, window)


def scale_weight_norms(args, ctx, window) -> None:
    """--scale_weight_norms: after each optimizer step, every LoRA's ΔW norm capped (networks/max_norm.py); its
    counts are read with the window."""
    if getattr(args, "scale_weight_norms", None):
        from networks.max_norm import max_norm_

        window.extend(max_norm_(ctx.network.loras, args.scale_weight_norms))


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving; carries the exit code (128 + signal)."""

    def __init__(self, exit_code):
        super().__init__(exit_code)
        self.exit_code = exit_code


class TrainContext:
    """What a training step needs besides the batch: the model, devices, dtypes and encoders."""

    def __init__(self, args, accelerator, model, network, weight_dtype, vae_dtype, te_cache, apt=None):
        self.args, self.accelerator, self.model, self.network = args, accelerator, model, network
        self.weight_dtype, self.vae_dtype, self.te_cache, self.apt = weight_dtype, vae_dtype, te_cache, apt
        self.window_losses, self.window_keys = [], []  # of the current accumulation window (NaN/inf check at its end)
        self.unet_graph = None  # a GraphedPass once enable_unet_graph() ran (--unet_cuda_graph)
        self.te_graph = None  # the same for the text encoders (--text_encoder_cuda_graph)
        self.keep_grads = False  # zero the gradients instead of freeing them (see _graphed)
        self.defer_read = False  # --defer_step_read: skip bad updates on the device, read each step a step later
        self.next_batch = None  # --apt_prior_ahead: gives the loop's next batch (None at its epoch's end)
        self._unet_fn = self._text_fn = None  # the passes' functions (`unet_fn`, `text_fn`), eager or recorded
        self._base_text = {}  # caption -> its encoding by the base text encoders (`encode_base_text`)
        self.batch_multipliers = False  # the datasets' network_multiplier values differ: set per batch

    def set_batch_multiplier(self, batch):
        """The LoRA at --network_multiplier x the batch's dataset's `network_multiplier` (sd-scripts' dataset key;
        a batch comes from one dataset), when the datasets' values differ. One shared value is set once, at the
        start; samples use --network_multiplier alone, the strength a user loads the file at."""
        if self.batch_multipliers:
            m = self.args.network_multiplier * batch["network_multiplier"]
            if m != self.network.multiplier:  # a run of batches from one dataset: set once
                self.network.set_multiplier(m)

    def unet_fn(self):
        """The fine-tuned UNet pass as one function (`library.unet_graph.unet_outputs`, APT's capture included):
        what `unet_pass` calls, and what `--unet_cuda_graph` records. Made once."""
        if self._unet_fn is None:
            from library.unet_graph import unet_outputs

            capture = self.apt.capture_fn if self.apt is not None else None
            self._unet_fn = unet_outputs(self.model, self.weight_dtype, self.accelerator.device.type, capture)
        return self._unet_fn

    def text_fn(self):
        """The text encoders on token ids as one function (`library.unet_graph.text_outputs`): what `encode_text`
        calls, and what `--text_encoder_cuda_graph` records. Made once."""
        if self._text_fn is None:
            from library.unet_graph import text_outputs

            self._text_fn = text_outputs(self.model, self.weight_dtype, self.accelerator.device.type,
                                         self.args.clip_skip, self.args.max_token_length)
        return self._text_fn

    def _graphed(self, flag, fn, loras, params, backend):
        """`fn`'s forward and backward from CUDA graphs (library/unet_graph.py), with autograd to `params`.
        With gradient accumulation the gradients stay allocated and are zeroed, not freed: a freed `.grad` would
        adopt the graph's gradient buffer, which the next micro-batch's replay overwrites before it is added."""
        import torch

        from library.unet_graph import GraphedPass, blocker_message

        bad = [lora.lora_name for lora in loras if lora.has_dropout]
        if bad:
            raise ValueError(blocker_message(flag, "LoRA dropout", f" ({len(bad)} modules, e.g. {bad[0]})"))
        graph = GraphedPass(fn, params, backend, max_graphs=self.args.unet_cuda_graph_max)
        if self.args.gradient_accumulation_steps > 1:  # every trainable gradient: zero_grad treats them alike
            self.keep_grads = True
            for p in self.network.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        return graph

    def enable_unet_graph(self, trainable, backend="cuda"):
        """--unet_cuda_graph: the step's UNet forward and backward from CUDA graphs."""
        self.unet_graph = self._graphed("unet_cuda_graph", self.unet_fn(), self.network.unet_loras, trainable, backend)

    def enable_te_graph(self, backend="cuda"):
        """--text_encoder_cuda_graph: the text encoders' forward and backward, when their LoRA trains."""
        params = [p for lora in self.network.text_encoder_loras for p in lora.parameters() if p.requires_grad]
        if not params:
            from library.unet_graph import blocker_message

            raise ValueError(blocker_message("text_encoder_cuda_graph", "no text-encoder LoRA trains"))
        self.te_graph = self._graphed("text_encoder_cuda_graph", self.text_fn(), self.network.text_encoder_loras,
                                      params, backend)

    def unet_pass(self, noisy, timesteps, cond, time_ids):
        """The fine-tuned UNet forward with grad: (prediction in float32, the flat capture tensors of APT's
        record), from `unet_fn`, or replayed from `unet_graph`."""
        run = self.unet_graph if self.unet_graph is not None else self.unet_fn()
        pred, *rest = run(noisy, timesteps, cond.context, cond.pooled, time_ids)
        return pred, rest

    def to_device(self, x, dtype=None):
        """A host tensor to the accelerator without waiting for it (`library.transfer.to_device`)."""
        from library.transfer import to_device

        return to_device(x, self.accelerator.device, dtype)

    def batch_to_device(self, batch: dict) -> dict:
        """The batch's tensors on the accelerator (`to_device`), once at the start of a step."""
        import torch

        return {k: self.to_device(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def encode_latents(self, batch):
        import torch

        device = self.accelerator.device
        if batch["latents"] is not None:
            return batch["latents"].to(device, torch.float32)
        with torch.no_grad():
            pixels = batch["images"].to(device, self.vae_dtype)
            latents = self.model.vae.encode(pixels).latent_dist.sample().float()
            latents = torch.nan_to_num(latents, 0.0, 0.0, 0.0)
        return latents * self.model.latent_scale

    def encode_text(self, captions):
        """The captions' TextConditioning on the device in the weight dtype: from the cache, or `text_fn` on their
        token ids (replayed from `te_graph` when the text-encoder LoRA trains and --text_encoder_cuda_graph is on)."""
        import torch

        from library.conditioning import TextConditioning, apply_token_weights, tokenize, tokenize_weighted

        if self.te_cache is not None:
            cached = self.te_cache.get(captions)
            return TextConditioning(*(None if t is None else self.to_device(t, self.weight_dtype)
                                      for t in (cached.context, cached.pooled)))
        train_te = not self.args.network_train_unet_only and torch.is_grad_enabled()  # the APT prior pass: no grad
        max_len = self.args.max_token_length
        ids, weights = (tokenize_weighted(self.model, captions, max_len) if self.args.weighted_captions
                        else (tokenize(self.model, captions, max_len), None))
        run = self.te_graph if train_te and self.te_graph is not None else self.text_fn()
        with torch.set_grad_enabled(train_te):
            context, *pooled = run(*(self.to_device(t) for t in ids))
            cond = TextConditioning(context, pooled[0] if pooled else None)
            if weights is not None:
                cond = apply_token_weights(cond, self.to_device(weights))
        return cond

    BASE_TEXT_MEMO = 256  # captions kept by encode_base_text (SDXL: ~0.3 MB each)

    def encode_base_text(self, captions):
        """The captions through the base text encoders (LoRA off, no grad), as APT's prior pass needs its class
        prompts c: memoised per caption on the device (the last BASE_TEXT_MEMO), since the base encoders never
        change; with their LoRA training that saves a text-encoder forward per step. The same values as
        `encode_text` with the LoRA multiplier at 0 (a LoRA at 0 is not computed at all)."""
        import torch

        from library.conditioning import TextConditioning

        if self.te_cache is not None:
            return self.encode_text(captions)
        memo = self._base_text
        missing = [c for c in dict.fromkeys(captions) if c not in memo]
        if missing:
            with torch.no_grad(), self.network.multiplier_override(0.0):
                cond = self.encode_text(missing)
            for i, caption in enumerate(missing):
                memo[caption] = cond[i]
        for caption in captions:  # most recently used last
            memo[caption] = memo.pop(caption)
        out = TextConditioning.cat([memo[c] for c in captions])
        while len(memo) > self.BASE_TEXT_MEMO:
            del memo[next(iter(memo))]  # least recently used first (dicts keep insertion order)
        return out


def planned_outputs(args, max_train_steps, num_epochs, start_step=0, start_epoch=1):
    """Every LoRA file this run will write (after `start_step` and from the end of `start_epoch` on, when resuming or
    starting at --initial_step), so that existing files are found before training starts rather than after hours
    of it."""
    from library.train_util import ckpt_name

    every = args.save_every_n_steps
    names = [ckpt_name(args.output_name)]
    if args.save_every_n_epochs:
        names += [ckpt_name(args.output_name, epoch=e) for e in range(args.save_every_n_epochs, num_epochs, args.save_every_n_epochs)
                  if e >= start_epoch]
    if every:
        first = (start_step // every + 1) * every
        names += [ckpt_name(args.output_name, step=s) for s in range(first, max_train_steps, every)]
    loras = list(names)
    from apt_ext.step import apt_enabled

    if apt_enabled(args):  # each LoRA's γ heatmap beside it
        names += [os.path.splitext(n)[0] + "_gamma.png" for n in loras]
    if args.save_state:
        names += [os.path.splitext(n)[0] + "-state" for n in loras]
    elif args.save_state_on_train_end:  # the final state only (it was found after training, and not written)
        names.append(os.path.splitext(names[0])[0] + "-state")
    if args.sample_prior_grid:
        names.append(f"{args.output_name}_grid.png")
    return [os.path.join(args.output_dir, n) for n in names]


def train(args):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from apt_ext.step import APT, apt_enabled

    from library import config_util, dataset as dataset_lib, metadata as metadata_lib, train_util
    from library.losses import check_noise_and_loss_args
    from library.noise import fix_noise_scheduler_betas_for_zero_terminal_snr
    from library.optimizers import (defer_step_read, evaluation_weights, get_lr_scheduler, get_optimizer,
                                    inner_optimizer, is_schedule_free)
    from library.conditioning import TextEncoderCache
    from library.distributed import broadcast_parameters, gather_objects
    from library.rng import rng_state, seed_rank_stream
    from library.step_read import LookAhead
    from library.transfer import HostCopy
    from library.interrupt import GracefulInterrupt
    from library.safe_io import remove_stale_temp_files
    from library.train_state import (advance_schedule, initial_position, load_state, past_epoch_end, read_state_info,
                                     save_state)
    from library.model_util import load_model, local_model_path, probe_model
    from networks import lora as lora_lib

    from library.args_check import verify_args

    started_at = time.time()  # ss_training_started_at: when the run started, as in sd-scripts (not after the load)
    verify_args(args)

    log_dir = None
    if args.log_with:
        log_dir = os.path.join(args.logging_dir or os.path.join(args.output_dir, "logs"),
                               (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S", time.localtime()))
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and not os.environ.get("WORLD_SIZE"):
        # train() called again in one process (tests, notebooks) with other settings: accelerate keeps a
        # per-process singleton that refuses a new mixed_precision; start from a clean one (single process only)
        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                                  mixed_precision=args.mixed_precision, log_with=args.log_with, project_dir=log_dir,
                                  # batches reach the device by non-blocking copies from the loader's pinned memory
                                  dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
                                  kwargs_handlers=train_util.accelerator_handlers(args))
    except ValueError as e:  # e.g. fp16 on Apple's mps with torch < 2.8: "not supported on 'mps'"
        if "precision" not in str(e):
            raise
        raise train_util.TrainingSetupError(
            f"--mixed_precision {args.mixed_precision}: accelerate refuses it on this device ({e}). Use "
            f"--mixed_precision bf16 or no (fp16 autocast on Apple's mps needs torch 2.8 or later)") from None
    is_main = accelerator.is_main_process

    def say(message: str) -> None:
        """accelerator.print above the progress bar: a plain print lands on the bar's line in a terminal."""
        if is_main:
            tqdm.write(message, file=sys.stdout)

    if os.environ.get("WORLD_SIZE", "1").isdigit() and int(os.environ.get("WORLD_SIZE", "1")) > accelerator.num_processes:
        raise train_util.TrainingSetupError(
            f"launched as {os.environ['WORLD_SIZE']} processes but accelerate set up {accelerator.num_processes}: "
            "on a machine without GPUs set ACCELERATE_USE_CPU=1 (accelerate launch --cpu), or launch with matching settings")
    state_info = read_state_info(args.resume) if args.resume else None  # its seed now, its position below
    saved_seed = state_info.get("seed") if state_info else None
    if saved_seed is not None and args.seed is not None and args.seed != saved_seed:
        raise train_util.TrainingSetupError(
            f"--resume {args.resume} was saved by a run with --seed {saved_seed}, and the seed decides the batch order, "
            f"the validation split and every draw: leave --seed out (the state's is used) or pass --seed {saved_seed}")
    if args.seed is None and saved_seed is not None:  # a run started without --seed continues with its own
        args.seed = int(saved_seed)
    if args.seed is None:  # one seed for all ranks: the LoRA initialisation must be identical everywhere
        from accelerate.utils import broadcast_object_list

        args.seed = broadcast_object_list([random.randint(0, 2**31 - 1) if is_main else None])[0]
    set_seed(args.seed)
    weight_dtype = train_util.weight_dtype(args.mixed_precision)
    vae_dtype = torch.float32 if args.no_half_vae else weight_dtype

    # --- data, then the model ------------------------------------------------------------------------
    # The model's kind comes from its header or configs alone, so a dataset mistake (or --debug_dataset) costs
    # seconds, not the multi-GB load, as in sd-scripts where the dataset is built before the model is loaded.
    model_path = local_model_path(args.pretrained_model_name_or_path)  # a cached hub id: looked up (and logged) once
    arch, v_param = probe_model(model_path, v2=args.v2, zero_terminal_snr=args.zero_terminal_snr,
                                v_parameterization=args.v_parameterization, sdxl=args.sdxl,
                                allow_pickle=args.allow_pickle_checkpoint)
    is_sdxl = arch == "sdxl"
    check_noise_and_loss_args(args, v_param)
    user_config = config_util.load_dataset_config(args.dataset_config) if args.dataset_config else None
    blueprints = config_util.generate_blueprint(user_config, args, config_path=args.dataset_config, is_sdxl=is_sdxl)
    if args.cache_latents:
        dataset_lib.check_latents_cacheable(blueprints)
    if args.cache_text_encoder_outputs:  # one stored output per caption string: varying captions never repeat
        for sub in (sub for bp in blueprints for sub in bp.subsets):
            varying = [k for k, on in (("shuffle_caption", sub.shuffle_caption),
                                       ("caption_tag_dropout_rate", sub.caption_tag_dropout_rate > 0)) if on]
            if varying:
                raise train_util.TrainingSetupError(
                    f"{sub.where}: {varying[0]} makes a new caption at almost every step, and "
                    "--cache_text_encoder_outputs keeps one encoding per caption, so the cache would only grow (as "
                    "sd-scripts, this is refused): turn it off for this subset, or drop the cache")
    if args.masked_loss and not any(sub.alpha_mask or sub.conditioning_data_dir
                                    for bp in blueprints for sub in bp.subsets):
        raise train_util.TrainingSetupError(
            "--masked_loss weights the loss by masks: set alpha_mask = true in the subsets whose images have an alpha "
            "channel (or pass --alpha_mask for all), or conditioning_data_dir = \"<folder of mask images>\" in a "
            "subset (docs/dataset_config.md, 'Loss masks')")
    varying_multiplier = len({bp.network_multiplier for bp in blueprints}) > 1  # set per batch (TrainContext)
    mask_dirs = [sub for bp in blueprints for sub in bp.subsets if sub.conditioning_data_dir]
    if mask_dirs and not args.masked_loss:
        raise train_util.TrainingSetupError(
            f"{mask_dirs[0].where}: conditioning_data_dir holds loss masks, which weight the loss only with "
            f"--masked_loss (as in sd-scripts): pass --masked_loss, or remove the key")
    if apt_enabled(args):  # fail now, not at the first step, when c cannot be derived from c*
        from apt_ext.prompts import PromptError, resolve_prior_class_tokens

        for bp in blueprints:
            for sub in bp.subsets:
                if sub.is_reg:  # reg captions are class prompts already: c = c*
                    continue
                try:
                    resolve_prior_class_tokens(sub.class_tokens, sub.prior_class_tokens)
                except PromptError as e:
                    raise PromptError(f"{sub.where}: {e}") from None
    sample_prompts = None
    prompt_size = 1024 if is_sdxl else 512  # a sample prompt's default width and height
    if args.sample_prompts:  # parse now: a bad prompt file should fail before training, not at the first sample
        from library.sampling import parse_prompt_file

        sample_prompts = parse_prompt_file(args.sample_prompts, default_size=prompt_size)
    data = dataset_lib.build_dataset_group(blueprints, is_sdxl=is_sdxl, seed=args.seed,
                                           prior_loss_weight=args.prior_loss_weight, split="train")
    val_data = None  # held-out images (validation_split): a validation loss, not trained on
    if any(bp.validation_split for bp in blueprints):
        val_data = dataset_lib.build_dataset_group(blueprints, is_sdxl=is_sdxl, seed=args.seed,
                                                   split="validation")
        if val_data is None:
            raise train_util.TrainingSetupError(
                "validation_split holds out no image: each subset keeps ceil((1 - split) x its images) for training, "
                "so with n images the split must be above 1/n; raise it, or leave it out")

    if apt_enabled(args):
        from apt_ext.prompts import captions_without_class_tokens, class_prompt_examples

        images = [info for ds in data.datasets for info in ds.images.values()]
        for line in class_prompt_examples(images):
            logger.info(line)
        for line in captions_without_class_tokens(images):
            logger.warning(line)
    if args.debug_dataset:
        from library.debug_dataset import debug_dataset

        debug_dataset(data, apt=apt_enabled(args), image_dir=args.debug_dataset_dir)
        return
    # the run's length, start and outputs: all known from the data, so a mistake costs no model load
    steps_per_epoch = math.ceil(len(data) / accelerator.num_processes / args.gradient_accumulation_steps)
    if args.max_train_epochs:
        args.max_train_steps = args.max_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if args.save_n_epoch_ratio:  # sd-scripts: about this many saves over the run
        args.save_every_n_epochs = math.floor(num_epochs / args.save_n_epoch_ratio) or 1
        logger.info("--save_n_epoch_ratio %g: a LoRA every %d epochs", args.save_n_epoch_ratio, args.save_every_n_epochs)
    if args.resume:
        start = past_epoch_end(args, (state_info["step"], state_info["epoch"], state_info["batches_done"]),
                               math.ceil(len(data) / accelerator.num_processes), num_epochs)
    else:
        start = initial_position(args, steps_per_epoch)
    if start[0] >= args.max_train_steps:
        given = f"--resume {args.resume} is at" if args.resume else "--initial_step/--initial_epoch start at"
        raise train_util.TrainingSetupError(
            f"{given} step {start[0]}, and the run ends at step {args.max_train_steps} (--max_train_steps/"
            f"--max_train_epochs count the earlier steps too): nothing is left to train; raise them")
    existing = [p for p in planned_outputs(args, args.max_train_steps, num_epochs, *start[:2]) if os.path.exists(p)]
    if existing and not args.overwrite:
        raise train_util.TrainingSetupError(f"output file exists: {existing[0]} ({len(existing)} in all). "
                                            "Choose another --output_name or --output_dir, or pass --overwrite to replace them")
    # Load straight into the dtypes the weights are cast to below (same values: a cast via fp32 rounds the same), so
    # no fp32 copy of the whole model is ever held (SDXL: 13.6 -> 7.1 GiB of host RAM). --base_weights merges in fp32.
    load_dtype, load_vae_dtype = (torch.float32, None) if args.base_weights else (weight_dtype, vae_dtype)
    model = load_model(model_path, v2=arch == "sd2", v_parameterization=v_param,
                       sdxl=is_sdxl, tokenizer_path=args.tokenizer_path, vae_path=args.vae,
                       allow_pickle=args.allow_pickle_checkpoint, dtype=load_dtype, vae_dtype=load_vae_dtype)
    layers = model.text_encoders[0].config.num_hidden_layers
    if args.clip_skip and is_sdxl:
        logger.warning("--clip_skip has no effect on SDXL: it reads its text encoders' fixed layers (sd-scripts warns "
                       "the same)")
    if args.clip_skip and not is_sdxl and args.clip_skip > layers:  # SDXL reads its fixed layers (sd-scripts)
        raise train_util.TrainingSetupError(f"--clip_skip {args.clip_skip} is more than the text encoder's {layers} "
                                            f"layers: use 1 (the last layer) to {layers}; 2 is the usual for "
                                            f"anime-style SD1 models")
    if args.base_weights or args.base_weights_multiplier:  # before any cast: in the precision the model loaded in
        from networks.merge import merge_base_weights

        for line in merge_base_weights(model, args.base_weights, args.base_weights_multiplier):
            accelerator.print(line)
    if args.zero_terminal_snr:
        fix_noise_scheduler_betas_for_zero_terminal_snr(model.noise_scheduler)
    os.makedirs(args.output_dir, exist_ok=True)
    if accelerator.is_main_process:
        for what in remove_stale_temp_files(args.output_dir):  # left by a run killed in the middle of a save
            logger.info("cleanup: %s", what)

    device = accelerator.device
    if device.type == "cpu" and args.mixed_precision == "fp16" and is_main:
        logger.warning("--mixed_precision fp16 on the CPU (no GPU in use): CPUs compute fp16 slowly, where it is "
                       "a GPU's fast path; --mixed_precision no (or bf16) trains faster here")
    model.vae.to(device, vae_dtype)
    if args.cache_latents:  # disk caches: the main process writes them, the others then read them
        with torch.no_grad(), accelerator.main_process_first() if args.cache_latents_to_disk else contextlib.nullcontext():
            for group in (data, val_data) if val_data is not None else (data,):
                # VAE samples from generators of their own: with disk caches only the main process encodes, and the
                # ranks' shared stream must not part before the LoRA is initialised; the held-out images' from the
                # validation seed, as their noise (in memory: the same whatever the training images and --seed)
                val_seed = args.validation_seed if args.validation_seed is not None else args.seed
                gen = torch.Generator().manual_seed(val_seed if group is val_data else args.seed)
                group.cache_latents(model.vae, model.latent_scale, vae_batch_size=args.vae_batch_size,
                                    to_disk=args.cache_latents_to_disk, device=device, generator=gen)
        model.vae.to("cpu")  # only sampling needs it again
    model.unet.to(device, weight_dtype)
    train_util.set_unet_layout(model.unet, args)
    for te in model.text_encoders:
        te.to(device, weight_dtype)
    from library.fp8_base import apply_fp8_flags

    for line in apply_fp8_flags(model, args, weight_dtype):  # after every .to(dtype), before the LoRA wraps layers
        accelerator.print(line)
    if args.xformers:
        model.unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        model.unet.train()  # diffusers checkpoints only in training mode
        if not args.network_train_unet_only:
            for te in model.text_encoders:
                te.gradient_checkpointing_enable()
                te.train()

    te_cache = None
    if args.cache_text_encoder_outputs:
        te_cache = TextEncoderCache(model, clip_skip=args.clip_skip, max_token_length=args.max_token_length,
                                    weighted=args.weighted_captions)

    # --- LoRA network, optimizer, schedule --------------------------------------------------------
    module_dims = lora_lib.dims_from_weights(args.network_weights)["modules"] if args.dim_from_weights else None
    network = lora_lib.create_network(model, args, module_dims)
    network.apply_to()
    if args.network_weights:
        network.load_weights(args.network_weights)
    # --network_multiplier x the datasets' network_multiplier: set once when they agree, else per batch
    network.set_multiplier(args.network_multiplier * (1.0 if varying_multiplier else blueprints[0].network_multiplier))
    network.to(device)
    broadcast_parameters(network.parameters(), accelerator)  # every rank starts from the main process's LoRA
    if varying_multiplier:  # read from the device: graphs record it, compiled blocks take it, as an input
        network.keep_multiplier_on_device(device)
    if args.full_bf16:  # the optimizer's states follow the weights' dtype
        network.cast_weights(torch.bfloat16)
    network.train()
    # the groups first: a learning rate of 0 freezes its LoRA (--text_encoder_lr 0: no text-encoder graph to record)
    params = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    if args.cuda_graphs == "auto":  # before APT, which records its prior pass when args.apt_cuda_graph is set
        from library.unet_graph import auto_cuda_graphs

        why = auto_cuda_graphs(args, device.type, network.has_dropout,
                               network.trains_text_encoder, apt_enabled(args))
        on = [f"--{f}" for f, w in why.items() if not w]
        off = [f"--{f} ({w})" for f, w in why.items() if w]
        accelerator.print(f"--cuda_graphs auto: on: {', '.join(on) or 'none'}; off: {', '.join(off) or 'none'}")
    try:  # after LoRA and attention processors are set. No batch is larger than max_rows: the ranks pad the
        # indicator's rows to it without asking each other
        apt = APT(args, model, device, max_rows=max(d.bp.batch_size for d in data.datasets)) if apt_enabled(args) else None
    except ValueError as e:
        raise train_util.TrainingSetupError(str(e)) from None
    from library.torch_compile import maybe_compile

    compiled = maybe_compile(args, model.unet)  # traced at the first step, LoRA and APT's processors included
    optimizer_name, optimizer = get_optimizer(args, params)
    lr_scheduler = get_lr_scheduler(args, optimizer, args.max_train_steps)

    loader = dataset_lib.make_loader(data, args, args.seed, device_type=device.type)
    if args.max_data_loader_n_workers is None and loader.num_workers and is_main:
        logger.info("data loader: %d persistent worker processes decode the images ahead of the steps "
                    "(--max_data_loader_n_workers 0 for none)", loader.num_workers)
    advice = dataset_lib.loader_advice(args, device.type)
    if advice and is_main:
        logger.warning(advice)
    optimizer, loader = accelerator.prepare(optimizer, loader)  # its sampler took the shared seed
    # everything all ranks must share is set up: ranks 1.. now draw their own noise, timesteps and augmentation
    seed_rank_stream(args.seed, accelerator.process_index)
    trainable = [p for p in network.parameters() if p.requires_grad]
    step, start_epoch, skip_batches = start
    if args.resume:
        saved = load_state(args.resume, network=network, optimizer=optimizer, lr_scheduler=lr_scheduler, apt=apt,
                           rank=accelerator.process_index)
        accelerator.print(f"resumed from {args.resume}: step {step}, epoch {start_epoch}"
                          + (f" (the earlier run saved epoch {start_epoch - 1}'s end, which its state precedes)"
                             if start_epoch != state_info["epoch"] else ""))
        if saved["rng_ranks"] != accelerator.num_processes:
            accelerator.print(f"note: the state was saved by {saved['rng_ranks']} process(es) and this run has "
                              f"{accelerator.num_processes}: the batches split otherwise and ranks without saved "
                              "generators start new streams, so this run is not the uninterrupted one")
    elif step:  # --initial_step/--initial_epoch: the count and the schedule go on; the optimizer starts afresh
        advance_schedule(lr_scheduler, step)
        accelerator.print(f"starting at step {step}, epoch {start_epoch}"
                          + (f", after the epoch's first {skip_batches} batches" if skip_batches else "")
                          + f" (learning rate {lr_scheduler.get_last_lr()[0]:.3g})")
    if is_schedule_free(optimizer):  # it starts on (and a state is saved with) the weights it evaluates
        inner_optimizer(optimizer).train()

    ctx = TrainContext(args, accelerator, model, network, weight_dtype, vae_dtype, te_cache, apt)
    ctx.batch_multipliers = varying_multiplier
    ctx.defer_read = defer_step_read(args, optimizer, device.type)
    try:
        if args.unet_cuda_graph:
            ctx.enable_unet_graph(trainable)
        if args.text_encoder_cuda_graph:
            ctx.enable_te_graph()
    except ValueError as e:
        raise train_util.TrainingSetupError(str(e)) from None
    metadata = metadata_lib.build_training_metadata(
        args, model=model, network=network, optimizer_name=optimizer_name, dataset_group=data,
        num_batches_per_epoch=len(loader), num_epochs=num_epochs, max_train_steps=args.max_train_steps,
        num_validation_images=val_data.num_train_images if val_data is not None else 0,
        num_processes=accelerator.num_processes, training_started_at=started_at)
    save_dtype = train_util.save_dtype(args)

    def save(name, step, epoch, batches_done, with_state=False, epochs_done=None):
        """Called by every process; the main one writes. `epoch`/`batches_done`: where a resume starts (epoch is
        1-based). ss_epoch is the epochs completed, as sd-scripts writes it: `epoch - 1` (mid-epoch, or an epoch end
        whose resume starts the next), unless given."""
        rng_states = None
        if args.save_state or with_state:  # every rank's generators, each as if its next step were not prepared
            if apt is not None and apt.ahead is not None:
                apt.ahead.rewind()
            rng_states = gather_objects(rng_state(), accelerator)
        if not is_main:
            return
        path = os.path.join(args.output_dir, name)
        md = metadata_lib.update_on_save(metadata, steps=step, epoch=epoch - 1 if epochs_done is None else epochs_done)
        md = metadata_lib.minimal(md) if args.no_metadata else md
        md.update(metadata_lib.modelspec(args, model))
        if apt is not None:
            md.update(apt.metadata())
        with evaluation_weights(optimizer):  # a schedule-free optimizer's evaluated weights (its state, too)
            network.save_weights(path, save_dtype, md, overwrite=args.overwrite)
            say(f"saved {path}")
            if apt is not None and apt.history:  # after the LoRA, which refuses an existing file first
                from apt_ext.heatmap import save_gamma_heatmap

                save_gamma_heatmap(apt.history, os.path.splitext(path)[0] + "_gamma.png")
            if rng_states is not None:
                state_dir = os.path.join(args.output_dir, os.path.splitext(name)[0] + "-state")
                save_state(state_dir, network=network, optimizer=optimizer, lr_scheduler=lr_scheduler, step=step,
                           epoch=epoch, batches_done=batches_done, seed=args.seed,
                           apt_state=apt.state_dict() if apt is not None else None, overwrite=args.overwrite,
                           rng_states=rng_states)

    def forget(names):
        """--save_last_n_*: delete the save that the one just written pushed out of the kept window."""
        for path in train_util.remove_old_save(args.output_dir, *names):
            say(f"removed {path} (--save_last_n_*)")

    val_loader = None
    if val_data is not None:
        val_data.set_current_epoch(1)  # one arrangement of the held-out batches, the same in every run
        val_loader = torch.utils.data.DataLoader(val_data, batch_size=1, shuffle=False,
                                                 collate_fn=dataset_lib.collate_batch)
        accelerator.print(f"validation: {val_data.num_train_images} held-out images, {len(val_data)} batches")

    last_validation = {}  # step -> loss: a step that ends an epoch too is validated once

    def validate(step, at_epoch_end=False):
        """The validation loss (library/validation.py) at this step, on every process (they stay in step), logged
        by the main one."""
        from library.validation import validation_loss

        if step not in last_validation:
            seed = args.validation_seed if args.validation_seed is not None else args.seed
            last_validation.clear()
            with evaluation_weights(optimizer):
                last_validation[step] = validation_loss(args, ctx, val_loader, seed, args.max_validation_steps)
            if is_main:
                progress.write(f"validation loss {last_validation[step]:.4f} at step {step}")
        if is_main and args.log_with:
            tag = "loss/validation/epoch_average" if at_epoch_end else "loss/validation/step_current"
            accelerator.log({tag: last_validation[step]}, step=step)

    def maybe_sample(step, epoch, at_epoch_end=False, first=False):
        """`first`: before this run's first step (step 0, or the resumed step: --sample_at_first shows what the
        run starts from)."""
        nonlocal sample_prompts
        if not sample_prompts or not is_main:
            return
        due = args.sample_at_first if first else (
            (args.sample_every_n_epochs and at_epoch_end and epoch % args.sample_every_n_epochs == 0)
            or (not args.sample_every_n_epochs and args.sample_every_n_steps and not at_epoch_end
                and step > 0 and step % args.sample_every_n_steps == 0))
        if due:
            from library.sampling import parse_prompt_file, sample_images

            try:  # read again at each sampling, as sd-scripts does, so that the prompts can be edited during a run
                fresh = parse_prompt_file(args.sample_prompts, default_size=prompt_size)
            except (ValueError, OSError) as e:  # SamplingError, a file that is not UTF-8, or one being rewritten
                logger.warning("%s: %s; sampling with the prompts read before", args.sample_prompts, e)
            else:
                if fresh:
                    sample_prompts = fresh
                else:  # an editor that truncates before it writes, or every line commented out for now
                    logger.warning("%s holds no prompt now; sampling with the prompts read before",
                                   args.sample_prompts)
            model.vae.to(device, vae_dtype)
            with evaluation_weights(optimizer), network.multiplier_override(args.network_multiplier):
                # a fresh run's first samples are "epoch 0" (sd-scripts' NAME_e000000_...); a resumed run's show
                # the step it continues from
                epoch_name = epoch if at_epoch_end else (0 if first and step == 0 else None)
                sample_images(model, sample_prompts, output_dir=args.output_dir, extra_modules=[network],
                              output_name=args.output_name, epoch=epoch_name,
                              step=None if epoch_name is not None else step, device=device, clip_skip=args.clip_skip,
                              sampler=args.sample_sampler, dtype=weight_dtype)
            if args.cache_latents:
                model.vae.to("cpu")

    if args.log_with:
        from library.run_log import tracker_config, tracker_init_kwargs

        accelerator.init_trackers(args.log_tracker_name or "network_train", init_kwargs=tracker_init_kwargs(args),
                                  config=tracker_config(args))
    accelerator.print(f"{data.num_train_images} train images, {data.num_reg_images} reg images, {len(data)} batches per epoch, "
                      f"{num_epochs} epochs, {args.max_train_steps} optimizer steps, {optimizer_name}")

    # --- the loop ---------------------------------------------------------------------------------
    loss_sum, loss_count, bad_steps = 0.0, 0, 0
    epoch_loss = [0.0, 0]  # this epoch's steps: loss/epoch_average at its end (sd-scripts')
    progress = tqdm(total=args.max_train_steps, initial=step, desc="steps", disable=not is_main, smoothing=0.1)
    maybe_sample(step, start_epoch, first=True)
    epoch, batches_done, interrupted = start_epoch, skip_batches, False
    read = True if args.log_with else ("apt/gamma_seen_mean",)  # logs read back at each step's end (one read)
    pending = None  # --defer_step_read: the last step's (window read, step, lrs, indicator copy), shown a step later

    def show(window, at_step, lrs, indicator):
        """A step's read on the progress bar and in the logs; or, for a dropped update, the warning and the count
        (too many stop the run)."""
        nonlocal loss_sum, loss_count, bad_steps
        if window.skipped:
            logger.warning(window.warning())
            bad_steps += 1
            if bad_steps >= args.max_bad_steps:
                raise train_util.TrainingSetupError(
                    f"{bad_steps} steps skipped for NaN/inf loss or gradients (--max_bad_steps {args.max_bad_steps}). "
                    "Likely causes: an fp16 VAE overflowing (use --no_half_vae or --mixed_precision bf16), "
                    "or a learning rate too high (lower --learning_rate / --unet_lr)")
            return
        values = window.values
        loss_sum, loss_count = loss_sum + values["loss"], loss_count + 1
        epoch_loss[0], epoch_loss[1] = epoch_loss[0] + values["loss"], epoch_loss[1] + 1
        postfix = dict(loss=f"{values['loss']:.4f}", avg=f"{loss_sum / loss_count:.4f}")
        if apt is not None:
            postfix["gamma"] = f"{values['apt/gamma_seen_mean']:.3f}"
        if "max_norm/keys_scaled" in values:  # sd-scripts shows these two
            postfix["keys_scaled"] = int(values["max_norm/keys_scaled"])
            postfix["avg_norm"] = f"{values['max_norm/average_key_norm']:.3f}"
        progress.set_postfix(postfix, refresh=False)  # drawn by the step's update: one line per step when piped
        if compiled is not None and loss_count == 1 and is_main:  # this run's first step (resumed too)
            progress.write(f"{compiled} in the first step")
        if args.log_with:
            logs = {k: v for k, v in values.items() if k != "loss"}
            if indicator is not None:
                logs.update(apt.indicator.logs(indicator.tolist()))
            accelerator.log({"loss/current": values["loss"], "loss/average": loss_sum / loss_count, "loss/bad_steps": bad_steps,
                             **{f"lr/{g.get('name', i)}": lr for i, (g, lr) in enumerate(zip(optimizer.param_groups, lrs))},
                             # D-Adaptation / Prodigy: the step size they use, d x lr (sd-scripts' lr/d*lr)
                             **{f"lr/d*lr/{g.get('name', i)}": float(g["d"]) * lr
                                for i, (g, lr) in enumerate(zip(optimizer.param_groups, lrs)) if "d" in g},
                             **logs}, step=at_step)

    with GracefulInterrupt() as stop, logging_redirect_tqdm(tqdm_class=tqdm):  # log lines above the bar too
        # epochs run until max_train_steps optimizer steps are done (without --defer_step_read, skipped NaN steps
        # add batches)
        for epoch in itertools.count(start_epoch):
            data.set_current_epoch(epoch)
            loader.set_epoch(epoch)  # the batch order of an epoch depends on (seed, epoch) only: resumable
            batches = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
            if data.has_token_warmup:  # captions final at their step before anything (LookAhead too) reads them
                batches = dataset_lib.captions_at_steps(batches, args, epoch_start=(epoch - 1) * steps_per_epoch,
                                                        position=skip_batches)
            batches_done, skip_batches = skip_batches, 0
            if args.apt_prior_ahead:  # the step peeks at the next batch to queue its prior pass
                batches = LookAhead(batches)
                ctx.next_batch = batches.peek
            for batch in batches:
                batches_done += 1
                ctx.set_batch_multiplier(batch)
                res = micro_batch(args, ctx, batch, optimizer, lr_scheduler, trainable, read=read)
                if res.status == "accumulating":
                    continue
                lrs = lr_scheduler.get_last_lr() if args.log_with else None  # what show() logs, taken now
                indicator = HostCopy(apt.indicator.log_tensor()) if apt is not None and args.log_with else None
                if res.status == "skipped":  # read at once: the step does not count
                    show(res.read, step, lrs, indicator)
                    continue
                step += 1
                if apt is not None:
                    apt.record(step)
                if res.status == "queued":  # decided on the device: counts, shown one step later
                    if pending is not None:
                        show(*pending)
                    pending = (res.read, step, lrs, indicator)
                else:
                    show(res.read, step, lrs, indicator)
                progress.update(1)  # after show: the bar is drawn once per step, with this step's values
                if stop.requested(accelerator) and step < args.max_train_steps:
                    interrupted = True
                    break
                if args.save_every_n_steps and step % args.save_every_n_steps == 0 and step < args.max_train_steps:
                    save(train_util.ckpt_name(args.output_name, step=step), step, epoch, batches_done)
                    if is_main:
                        forget(train_util.rotated_out(args, step=step))
                maybe_sample(step, epoch)
                if val_loader is not None and args.validate_every_n_steps and step % args.validate_every_n_steps == 0:
                    validate(step)
                if step >= args.max_train_steps:
                    break
            if interrupted:
                break
            if args.log_with:  # the epoch's mean step loss, as sd-scripts logs it (its last step's read comes first)
                if pending is not None:
                    show(*pending)
                    pending = None
                if epoch_loss[1]:
                    accelerator.log({"loss/epoch_average": epoch_loss[0] / epoch_loss[1]}, step=step)
            epoch_loss[:] = [0.0, 0]
            if args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0 and epoch < num_epochs:
                save(train_util.ckpt_name(args.output_name, epoch=epoch), step, epoch + 1, 0)
                if is_main:
                    forget(train_util.rotated_out(args, epoch=epoch))
            maybe_sample(step, epoch, at_epoch_end=True)
            if val_loader is not None and (args.validate_every_n_epochs is None
                                           or epoch % args.validate_every_n_epochs == 0):
                validate(step, at_epoch_end=True)
            if step >= args.max_train_steps:
                break
        if pending is not None:
            show(*pending)
        progress.close()
        if compiled is not None:
            accelerator.print(f"{compiled} over the run")
        if interrupted:
            accelerator.wait_for_everyone()
            name = train_util.ckpt_name(args.output_name, step=step)
            stem = os.path.splitext(name)[0]
            if not args.overwrite and any(os.path.lexists(os.path.join(args.output_dir, stem + end))
                                          for end in (".safetensors", "-state", "_gamma.png")):
                # an earlier run stopped at this step in this folder (its name could not be checked before
                # training): keep it, and save this run's progress beside it
                name = stem + time.strftime("-%Y%m%d-%H%M%S") + ".safetensors"
            save(name, step, epoch, batches_done, with_state=True)
            state_dir = os.path.join(args.output_dir, os.path.splitext(name)[0] + "-state")
            accelerator.print(f"interrupted at step {step}: saved {os.path.join(args.output_dir, name)} and {state_dir}.\n"
                              f"Continue with the same command plus --resume {state_dir} (or --resume latest)")
            raise Interrupted(stop.exit_code)

    accelerator.wait_for_everyone()
    save(train_util.ckpt_name(args.output_name), step, epoch, batches_done, with_state=args.save_state_on_train_end,
         epochs_done=num_epochs)  # sd-scripts: the final file says num_train_epochs
    if is_main:
        if args.sample_prior_grid and sample_prompts:
            import io

            from library.safe_io import atomic_write_bytes
            from library.sampling import prior_vs_lora_grid

            model.vae.to(device, vae_dtype)
            with evaluation_weights(optimizer), network.multiplier_override(args.network_multiplier):
                grid = prior_vs_lora_grid(model, network, sample_prompts, seed=args.seed, upscale_to=128,
                                          multipliers=(0.0, args.network_multiplier),
                                          device=device, clip_skip=args.clip_skip, sampler=args.sample_sampler,
                                          dtype=weight_dtype)
            path = os.path.join(args.output_dir, f"{args.output_name}_grid.png")
            buf = io.BytesIO()
            grid.save(buf, format="PNG")
            atomic_write_bytes(path, buf.getvalue(), overwrite=True)  # checked with the LoRA files before training
            accelerator.print(f"saved {path} (prior vs LoRA at fixed seeds)")
    if args.log_with:
        accelerator.end_training()
    return network


def quiet_libraries() -> None:
    """diffusers/transformers warn about things that do not concern a LoRA run (dtype casts, torchvision)."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv=None) -> int:
    from library.config_util import ConfigError
    from library.model_util import ModelLoadError
    from apt_ext.prompts import PromptError
    from apt_ext.step import apply_preset
    from library.config_file import given_dests, parse_args_with_config, write_config_file
    from library.sampling import SamplingError
    from library.train_state import StateError
    from library.train_util import TrainingSetupError
    from networks.lora import LoRAWeightsError

    for stream in (sys.stdout, sys.stderr):  # a Windows console or pipe in cp1252 cannot encode every path: a
        try:  # "saved D:\Дом\lora.safetensors" raised UnicodeEncodeError after the save, and stopped the run
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    parser = setup_parser()
    args = None
    try:
        args = parse_args_with_config(parser, argv)
        given = given_dests(parser, argv)
        changed = apply_preset(args, given)
        if changed:
            logger.info("--apt_preset %s set %s", args.apt_preset, ", ".join(changed))
        if args.output_config:
            if not args.config_file:
                raise TrainingSetupError("--output_config needs --config_file PATH to write to")
            print(f"wrote {write_config_file(args, parser, args.config_file, overwrite=args.overwrite, given=given)}")
            return 0
        from library.run_log import console_log

        with console_log(args):
            train(args)
    except (ConfigError, ModelLoadError, LoRAWeightsError, TrainingSetupError, SamplingError, PromptError, StateError,
            FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a save on a full disk or a read-only folder: one line, not a traceback
        import errno

        from library.interrupt import find_latest_state
        from library.safe_io import PathTooLongError, SaveError

        if not isinstance(e, SaveError) and e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        state = find_latest_state(args.output_dir, args.output_name) if args is not None and args.output_dir else None
        advice = "" if isinstance(e, PathTooLongError) else ". Free space or fix the folder's permissions"
        print(f"error: {e}{advice}; what was saved before is complete (saves are atomic)"
              + (f": continue with --resume {state}" if state else ""), file=sys.stderr)
        return 1
    except Interrupted as e:
        return e.exit_code
    except KeyboardInterrupt:
        print("stopped at once by a second signal: files on disk are complete (saves are atomic); "
              "resume from the last saved state with --resume latest", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
