"""One APT training step (DESIGN.md §1 "one training step", §2), and the state APT keeps across steps.

    t, ε drawn → γ looked up (state before this step) → adaptive zoom-out/rotation with p = min(γ, p_max)
    → prior pass (LoRA multiplier 0, class prompt c, no grad, captured) → fine-tuned pass (prompt c*,
    captured) → (1 − γ)-weighted denoising loss + λ_dist (L_μ + L_σ) + λ_attn L_attn → indicator update.

`APT` holds the indicator, the augmenter, the capture hooks and the γ history; `apt_step` is the step, and
`prepare_step` its part up to the prior pass (which --apt_prior_ahead runs a step early).
The same machinery gives the DCO baseline (`--loss_type dco`), which needs the prior pass but nothing else.
"""
from __future__ import annotations

import json
from typing import NamedTuple, Optional

import torch

from apt_ext.augment import AdaptiveAugment, black_latent
from apt_ext.indicator import OverfittingIndicator, default_temperature
from apt_ext.losses import adaptive_weights, attn_loss, dco_loss, rs_losses, total_loss
from apt_ext.prompts import ALIGN_MODES, alignment_for_batch, class_prompts

COMPONENTS = ("ata", "rs", "aa")  # adaptive training adjustment, representation stabilization, attention alignment

# --apt_preset: the paper's settings (§2.8). Applied to every argument the user left at its default.
PRESETS = {
    "sdxl": dict(apt_gamma_temperature=1000.0),
    "sd2": dict(apt_gamma_temperature=100.0),
    "sd1": dict(apt_gamma_temperature=100.0),
}
PRESET_TRAINING = dict(network_dim=32, network_alpha=32.0, unet_lr=5e-5, text_encoder_lr=5e-6, learning_rate=5e-5,
                       optimizer_type="AdamW")


def parse_components(text: str | None) -> frozenset:
    """`--apt_components ata,rs,aa` (any subset; "all" or None = all three; "none" = monitor only: the prior
    pass and the overfitting indicator run, γ is logged and drawn, the training itself is plain DreamBooth)."""
    if text is None or text.strip().lower() == "all":
        return frozenset(COMPONENTS)
    if text.strip().lower() == "none":
        return frozenset()
    parts = {p.strip().lower() for p in text.split(",") if p.strip()}
    unknown = parts - set(COMPONENTS)
    if unknown or not parts:
        raise ValueError(f"--apt_components {text!r}: expected a comma-separated subset of {','.join(COMPONENTS)} "
                         f"(ata = adaptive training adjustment, rs = representation stabilization, "
                         f"aa = attention alignment), or all, or none (monitor γ only)")
    return frozenset(parts)


def apply_preset(args, given: set) -> list[str]:
    """Apply `--apt_preset` to the arguments the user did not set (`given`: set on the command line or in
    --config_file, whatever the value); returns the names it set."""
    if not getattr(args, "apt_preset", None):
        return []
    changed = []
    for name, value in {**PRESET_TRAINING, **PRESETS[args.apt_preset]}.items():
        if name not in given:
            setattr(args, name, value)
            changed.append(name)
    args.apt = True
    return changed


def apt_enabled(args) -> bool:
    """The APT step runs for --apt and for the DCO baseline (both need the prior pass)."""
    return bool(getattr(args, "apt", False)) or getattr(args, "loss_type", "l2") == "dco"


class APT:
    """Everything APT keeps across steps. Build it after LoRA is applied and attention processors are set."""

    def __init__(self, args, model, device, max_rows: Optional[int] = None):
        self.components = parse_components(args.apt_components) if args.apt else frozenset()
        if args.apt_identifier_align not in ALIGN_MODES:
            raise ValueError(f"--apt_identifier_align must be one of {ALIGN_MODES}")
        self.args = args
        tau = args.apt_gamma_temperature or default_temperature(model.arch)
        self.indicator = OverfittingIndicator(args.apt_num_bins, model.noise_scheduler.config.num_train_timesteps,
                                              args.apt_ema_alpha, tau, device=device)
        self.indicator.max_rows = max_rows  # the largest batch any rank sees (multi-process updates pad to it)
        self.augment = AdaptiveAugment(args.apt_aug_p_max, tuple(args.apt_aug_scale), args.apt_aug_rotation)
        self.aug_space = args.apt_aug_space
        if self.aug_space == "auto":
            self.aug_space = "latent" if args.cache_latents else "pixel"
        if self.aug_space == "pixel" and args.cache_latents and "ata" in self.components:
            raise ValueError("--apt_aug_space pixel needs images, but --cache_latents stores latents: "
                             "use --apt_aug_space latent (or auto), or drop --cache_latents")
        self.fill_latent = None
        if "ata" in self.components and self.aug_space == "latent":
            with torch.no_grad():
                self.fill_latent = black_latent(model.vae, model.latent_scale, device=device)
        self.capture = None
        if self.components & {"rs", "aa"}:
            from apt_ext.capture import APTCapture, select_layers

            layers = select_layers(model.unet, model.arch, args.apt_layers)
            self.capture = APTCapture(model.unet, layers, args.apt_rs_hook, args.apt_rs_stats).install()
        self._history: list[tuple[int, torch.Tensor]] = []  # (optimizer step, γ per bin on the device)
        self.static_prior = None  # a StaticPass once enable_static_prior() ran (--apt_cuda_graph)
        self._prior_fn = None  # the prior pass's function (`prior_fn`), eager or wrapped by static_prior
        self._pi_rows: dict[tuple, torch.Tensor] = {}  # memo of alignment()
        self.ahead = None  # --apt_prior_ahead: the next step's prior pass, queued before this step's backward
        if getattr(args, "apt_prior_ahead", False):
            from apt_ext.prior_ahead import PriorAhead

            self.ahead = PriorAhead(device)
        if getattr(args, "apt_cuda_graph", False):  # the trainer refuses it without CUDA; benches dry-run it eagerly
            kind = torch.device(device).type
            self.enable_static_prior(model, args.mixed_precision, kind, "cuda" if kind == "cuda" else "eager")

    def enable_static_prior(self, model, mixed_precision: str, device_type: str, backend: str = "cuda") -> None:
        """Run the prior pass through a `StaticPass` (apt_ext/prior_graph.py): a CUDA graph per input shape.
        Autocast runs with its weight-cast cache off, as graph recording requires."""
        from apt_ext.prior_graph import StaticPass
        from library.train_util import weight_dtype

        self.static_prior = StaticPass(self.prior_fn(model, weight_dtype(mixed_precision), device_type), backend)

    def prior_fn(self, model, dtype, device_type: str):
        """The prior pass's function (`library.unet_graph.unet_outputs`, capture tag "prior"): called as is, or
        replayed through `static_prior`. Made once."""
        if self._prior_fn is None:
            from library.unet_graph import unet_outputs

            self._prior_fn = unet_outputs(model, dtype, device_type, self.capture_fn, tag="prior")
        return self._prior_fn

    @property
    def capture_fn(self):
        """`capture_ctx`, or None without rs/aa (what `unet_outputs` takes)."""
        return self.capture_ctx if self.capture is not None else None

    def prior_pass(self, ctx, noisy, timesteps, cond, time_ids):
        """The prior pass's UNet forward (call it with the LoRA multiplier at 0, without grad): the prediction
        and the capture record (None without rs/aa), eager or replayed from `static_prior`."""
        run = self.static_prior  # (not `or`: a StaticPass with no recording yet has len 0)
        if run is None:
            run = self.prior_fn(ctx.model, ctx.weight_dtype, ctx.accelerator.device.type)
        pred, *rest = run(noisy, timesteps, cond.context, cond.pooled, time_ids)
        return pred, self.record_from_flat("prior", rest)

    def ft_pass(self, ctx, noisy, timesteps, cond, time_ids):
        """The fine-tuned UNet forward (LoRA on, prompt c*, with grad): the prediction and the capture record,
        eager or replayed from the trainer's CUDA graphs (`TrainContext.unet_pass`)."""
        pred, flat = ctx.unet_pass(noisy, timesteps, cond, time_ids)
        return pred, self.record_from_flat("ft", flat)

    def record_from_flat(self, tag, flat):
        """The capture record of a pass whose tensors came back as one list (`CaptureRecord.flat`); None
        without rs/aa."""
        from apt_ext.capture import CaptureRecord

        if self.capture is None:
            return None
        heads = [m.heads for _, m in self.capture.attn_modules]
        return CaptureRecord.from_flat(tag, self.capture.attn_names, self.capture.stats_names, heads, flat)

    PI_MEMO_SIZE = 4096

    def alignment(self, model, captions, prior_captions, class_tokens, prior_class_tokens, device):
        """π (B, N) for the UNet's cross-attention maps (tokenizer 1's; SDXL's second gives the same, §2.5), or
        None when c == c* for the whole batch. Rows are memoised per sample on the device: tokenizing and diffing
        is host work (about 2 ms a sample) that would otherwise repeat on every step of every epoch."""
        from library.transfer import to_device

        if list(captions) == list(prior_captions):
            return None
        rows = []
        for c, p, ct, pct in zip(captions, prior_captions, class_tokens, prior_class_tokens):
            key = (c, p, ct, pct)
            row = self._pi_rows.get(key)
            if row is None:
                if len(self._pi_rows) >= self.PI_MEMO_SIZE:  # shuffled or dropped-out captions: keep it bounded
                    self._pi_rows.clear()
                (pi,) = alignment_for_batch(model.tokenizers[:1], [c], [p], self.args.apt_identifier_align,
                                            self.args.max_token_length, [ct], [pct],
                                            weighted=bool(getattr(self.args, "weighted_captions", False)))
                row = self._pi_rows[key] = to_device(pi[0], device)
            rows.append(row)
        return torch.stack(rows)

    def capture_ctx(self, tag):
        import contextlib

        return self.capture.capture(tag) if self.capture is not None else contextlib.nullcontext()

    def record(self, step: int) -> None:
        """Keep γ of this optimizer step (a device copy: read back only when saved or drawn)."""
        self._history.append((step, self.indicator.gamma().clone()))

    @property
    def history(self) -> list[tuple[int, list[float]]]:
        """(optimizer step, γ per bin) for the heatmap and the saved state."""
        if not self._history:
            return []
        gammas = torch.stack([g for _, g in self._history]).cpu().tolist()
        return [(s, g) for (s, _), g in zip(self._history, gammas)]

    def state_dict(self) -> dict:
        state = {f"indicator.{k}": v for k, v in self.indicator.state_dict().items()}
        if self._history:
            state["history.steps"] = torch.tensor([s for s, _ in self._history], dtype=torch.int64)
            state["history.gamma"] = torch.stack([g for _, g in self._history]).cpu().float()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.indicator.load_state_dict({k[len("indicator."):]: v for k, v in state.items() if k.startswith("indicator.")})
        self._history = []
        if "history.steps" in state:
            # a copy: on the CPU .to() returns the loaded tensor, a map of the state's file (Windows then refuses
            # to replace that state folder while the run holds it)
            g = state["history.gamma"].to(self.indicator.device, copy=True)
            self._history = list(zip(state["history.steps"].tolist(), g.unbind(0)))

    def metadata(self) -> dict[str, str]:
        """The `apt_*` keys of the saved LoRA (strings, like every safetensors metadata value)."""
        a = self.args
        md = {
            "apt_enabled": str(bool(a.apt)),
            "apt_components": ",".join(c for c in COMPONENTS if c in self.components),
            "apt_loss_type": a.loss_type,
            "apt_gamma_temperature": str(self.indicator.temperature),
            "apt_ema_alpha": str(self.indicator.ema_alpha),
            "apt_num_bins": str(self.indicator.num_bins),
            "apt_aug_p_max": str(self.augment.p_max),
            "apt_aug_scale": json.dumps(list(self.augment.scale_range)),
            "apt_aug_rotation": str(self.augment.rotation_deg),
            "apt_aug_space": self.aug_space,
            "apt_lambda_dist": str(a.apt_lambda_dist),
            "apt_lambda_attn": str(a.apt_lambda_attn),
            "apt_layers": json.dumps(self.capture.layers if self.capture is not None else (a.apt_layers or [])),
            "apt_rs_hook": a.apt_rs_hook,
            "apt_rs_stats": a.apt_rs_stats,
            "apt_identifier_align": a.apt_identifier_align,
            "apt_preset": str(a.apt_preset),
            "apt_gamma_final": json.dumps([round(g, 6) for g in self.indicator.gamma().tolist()]),
            "apt_indicator_steps": str(self.indicator.step),
        }
        if a.loss_type == "dco":
            md["apt_dco_beta"] = str(a.dco_beta)
        return md


class StepInputs(NamedTuple):
    """A step's inputs and its prior pass: everything before the fine-tuned pass (`prepare_step`)."""

    batch: dict  # on the device (images augmented in pixel space)
    is_reg: torch.Tensor
    timesteps: torch.Tensor
    gamma: torch.Tensor  # γ of t's bin, from the indicator state before this step
    p_aug: torch.Tensor
    aug_mask: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor
    time_ids: Optional[torch.Tensor]
    prior_captions: list
    pred_prior: torch.Tensor
    rec_prior: object  # CaptureRecord or None
    loss_mask: Optional[torch.Tensor] = None  # alpha masks (B, H, W) as augmented, weighting both passes' losses


def prepare_step(args, ctx, batch, apt: APT) -> StepInputs:
    """t, γ, the augmentation, ε and x_t, then the prior pass. Every draw of the step happens here, in this order,
    so that running it a step ahead (--apt_prior_ahead, apt_ext/prior_ahead.py) draws the same numbers."""
    from library.noise import add_noise, get_target, sample_noise, sample_timesteps
    from library.conditioning import sdxl_time_ids

    model, device, weight_dtype = ctx.model, ctx.accelerator.device, ctx.weight_dtype
    comps = apt.components
    bsz = len(batch["captions"])
    batch = ctx.batch_to_device(batch)  # once, without a stream sync (TrainContext.to_device)
    is_reg = batch["is_reg"].to(device)

    # t first: augmentation depends on γ of t's bin (the state before this step)
    timesteps = sample_timesteps(args, model.noise_scheduler, bsz, device)
    gamma = apt.indicator.gamma_for(timesteps).to(device)
    aug_mask = torch.zeros(bsz, dtype=torch.bool, device=device)
    p_aug = torch.zeros(bsz, device=device)
    loss_mask = batch.get("alpha_masks")  # per-pixel loss weights: they move with the augmented content
    if "ata" in comps:
        p_aug = torch.where(is_reg, torch.zeros_like(gamma), gamma).clamp(0.0, apt.augment.p_max)
        if apt.aug_space == "pixel":
            images, aug_mask, loss_mask = apt.augment(batch["images"].to(device), p_aug, "pixel", loss_mask=loss_mask)
            batch = dict(batch, images=images)
            latents = ctx.encode_latents(batch)
        else:
            latents, aug_mask, loss_mask = apt.augment(ctx.encode_latents(batch), p_aug, "latent",
                                                       fill_latent=apt.fill_latent, loss_mask=loss_mask)
    else:
        latents = ctx.encode_latents(batch)

    noise = sample_noise(args, latents)
    noisy = add_noise(args, model.noise_scheduler, latents, noise, timesteps).to(weight_dtype)
    target = get_target(model.noise_scheduler, latents, noise, timesteps).float()
    time_ids = None
    if model.is_sdxl:  # size conditioning is left unchanged by the augmentation (§2.2)
        time_ids = sdxl_time_ids(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]).to(device)

    prior_captions = class_prompts(batch["captions"], batch["class_tokens"], batch["prior_class_tokens"])
    # prior pass: the base model (LoRA multiplier 0 on UNet and text encoders), class prompt c, no grad
    with torch.no_grad(), ctx.network.multiplier_override(0.0):
        cond_prior = ctx.encode_base_text(prior_captions)  # memoised per caption: the base encoders never change
        pred_prior, rec_prior = apt.prior_pass(ctx, noisy, timesteps, cond_prior, time_ids)
    return StepInputs(batch, is_reg, timesteps, gamma, p_aug, aug_mask, noisy, target, time_ids, prior_captions,
                      pred_prior, rec_prior, loss_mask)


def apt_step(args, ctx, batch, apt: APT):
    """One micro-batch with APT (or DCO). Returns (loss, logs); the indicator is updated in place.
    With --apt_prior_ahead, `prepare_step` of the trainer's next batch (`ctx.next_batch()`) is queued at the end,
    before this step's backward, and taken by the next step."""
    from library.losses import get_huber_c, per_sample_loss, post_process_loss

    model, accelerator = ctx.model, ctx.accelerator
    device = accelerator.device
    comps = apt.components
    x = (apt.ahead.take(batch) if apt.ahead is not None else None) or prepare_step(args, ctx, batch, apt)
    batch, is_reg, timesteps, gamma, p_aug, aug_mask = x.batch, x.is_reg, x.timesteps, x.gamma, x.p_aug, x.aug_mask
    noisy, target, time_ids, pred_prior, rec_prior = x.noisy, x.target, x.time_ids, x.pred_prior, x.rec_prior
    captions, prior_captions = batch["captions"], x.prior_captions

    # fine-tuned pass: LoRA on, prompt c*, with grad
    cond = ctx.encode_text(captions)
    pred, rec_ft = apt.ft_pass(ctx, noisy, timesteps, cond, time_ids)

    # per-sample MSE of both passes: the indicator's inputs, unweighted (§2.1) but for the alpha masks, which
    # weight both alike (the indicator compares the two models on the same pixels)
    mse_ft = per_sample_loss(pred, target, "l2", mask=x.loss_mask)
    mse_prior = per_sample_loss(pred_prior, target, "l2", mask=x.loss_mask)

    if args.loss_type == "dco":  # DCO on subject samples; reg samples keep the plain loss (prior preservation)
        loss_dm = torch.where(is_reg, mse_ft, dco_loss(mse_ft, mse_prior, args.dco_beta))
        loss_dm = loss_dm * batch["loss_weights"].to(device)
    else:
        huber_c = get_huber_c(args, timesteps, model.noise_scheduler)
        loss_dm = mse_ft if args.loss_type == "l2" else per_sample_loss(pred, target, args.loss_type, huber_c,
                                                                        mask=x.loss_mask)
        loss_dm = post_process_loss(loss_dm * batch["loss_weights"].to(device), args, timesteps,
                                               model.noise_scheduler)

    weights = adaptive_weights(gamma, is_reg) if "ata" in comps else None
    l_mu = l_sigma = l_attn = None
    if "rs" in comps:
        l_mu, l_sigma = rs_losses(rec_ft.stats, rec_prior.stats)
    if "aa" in comps:
        pi = apt.alignment(model, captions, prior_captions, batch["class_tokens"], batch["prior_class_tokens"], device)
        l_attn = attn_loss(rec_ft.attn, rec_prior.attn, pi, rec_ft.num_heads)
    loss = total_loss(loss_dm, weights, l_mu, l_sigma, l_attn, args.apt_lambda_dist, args.apt_lambda_attn)

    apt.indicator.sync_update(accelerator, timesteps, mse_prior.detach(), mse_ft.detach(), is_reg)
    upcoming = ctx.next_batch() if apt.ahead is not None and getattr(ctx, "next_batch", None) else None
    if upcoming is not None:  # after the indicator update: the next step's γ needs it
        apt.ahead.start(upcoming, lambda: prepare_step(args, ctx, upcoming, apt))

    # 0-d device tensors: the trainer reads them only when it logs (no host sync inside the step)
    logs = {
        "apt/L_theta": mse_ft.detach().mean(),
        "apt/L_phi": mse_prior.mean(),
        "apt/delta_noise": (pred.detach() - pred_prior).pow(2).mean(),
        "apt/gamma_mean_batch": gamma.mean(),
        "apt/gamma_seen_mean": apt.indicator.gamma_seen_mean(),
        "apt/p_aug": p_aug.mean(),
        "apt/aug_fraction": aug_mask.float().mean(),
    }
    if l_mu is not None:
        logs["apt/L_mu"], logs["apt/L_sigma"] = l_mu.detach(), l_sigma.detach()
    if l_attn is not None:
        logs["apt/L_attn"] = l_attn.detach()
    return loss, logs
