"""APT's overfitting indicator (DESIGN.md §2.1, paper Eq. 1).

The timestep axis is cut into B bins. For every bin we keep an exponential moving average of the
per-sample denoising loss of the prior model (φ: LoRA off, class prompt c) and of the fine-tuned model
(θ: LoRA on, identifier prompt c*), both on the same x_t, t and ε. When the fine-tuned model fits the
training images much better than the prior does, ema_φ − ema_θ grows, and

    γ_b = clamp(1 − exp(−τ · (ema_φ,b − ema_θ,b)), 0, 1)

approaches 1: bin b is overfitting. γ drives both the augmentation probability (§2.2) and the loss
weight 1 − γ (§2.3).

Device: the state (B float64 numbers per EMA) lives on the training device, so the γ lookup before the
step and the EMA update after it are device ops with no host synchronisation (DESIGN.md §2.1; issue 6).
MPS has no float64: there the state stays on the CPU. `state_dict()` always returns CPU tensors, and
`logs()` reads the values (the one place that synchronises: call it only when logging).
"""
from __future__ import annotations

from typing import Optional

import torch

NUM_BINS = 10
EMA_ALPHA = 0.1


def default_temperature(arch: str) -> float:
    """τ (`apt_gamma_temperature`, the paper's T): 1000 for SDXL, 100 for SD1.x / SD2.x (§2.1)."""
    return 1000.0 if arch == "sdxl" else 100.0


class OverfittingIndicator:
    """Per-timestep-bin EMAs of the prior and fine-tuned losses, and the overfitting measure γ.

    Call `gamma_for(t)` before the step (the γ used for augmentation and loss weighting is the state
    before this step's losses are seen), then `update(...)` / `sync_update(...)` with the detached,
    unweighted per-sample losses of both passes. One update per micro-batch (gradient accumulation
    updates once per micro-batch).
    """

    def __init__(self, num_bins: int = NUM_BINS, num_train_timesteps: int = 1000, ema_alpha: float = EMA_ALPHA,
                 temperature: float = 100.0, device=None):
        if num_bins < 1 or num_train_timesteps < 1:
            raise ValueError(f"num_bins ({num_bins}) and num_train_timesteps ({num_train_timesteps}) must be >= 1")
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_bins = int(num_bins)
        self.num_train_timesteps = int(num_train_timesteps)
        self.ema_alpha = float(ema_alpha)
        self.temperature = float(temperature)
        device = torch.device(device if device is not None else "cpu")
        self.device = torch.device("cpu") if device.type == "mps" else device
        z = dict(device=self.device)
        self.ema_prior = torch.zeros(self.num_bins, dtype=torch.float64, **z)  # ema_φ
        self.ema_ft = torch.zeros(self.num_bins, dtype=torch.float64, **z)  # ema_θ
        self.seen = torch.zeros(self.num_bins, dtype=torch.bool, **z)
        self.bin_updates = torch.zeros(self.num_bins, dtype=torch.int64, **z)  # EMA updates per bin (for logs)
        self.step = 0  # update() calls
        self.max_rows = None  # sync_update's padding: a bound on any rank's batch size, when the trainer knows one

    # ------------------------------------------------------------------ bins and gamma
    def bin_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """floor(t · B / T) clamped to [0, B−1], as a LongTensor on the indicator's device (t = 0 is the least
        noisy)."""
        t = torch.as_tensor(timesteps).detach().to(self.device)
        if t.is_floating_point():
            b = torch.floor(t.double() * self.num_bins / self.num_train_timesteps).long()
        else:  # exact integer arithmetic: no float rounding at the bin edges
            b = torch.div(t.long() * self.num_bins, self.num_train_timesteps, rounding_mode="floor")
        return b.clamp_(0, self.num_bins - 1)

    def gamma(self) -> torch.Tensor:
        """γ per bin, (B,) float32 on the indicator's device; 0 for a bin never seen."""
        g = 1.0 - torch.exp(-self.temperature * (self.ema_prior - self.ema_ft))  # exp overflow -> -inf -> clamped to 0
        g = g.clamp(0.0, 1.0)
        return torch.where(self.seen, g, torch.zeros_like(g)).float()

    def gamma_seen_mean(self) -> torch.Tensor:
        """Mean γ over the bins seen so far (0 before any), a 0-d device tensor: the progress bar's γ."""
        seen = self.seen.float()
        return (self.gamma() * seen).sum() / seen.sum().clamp(min=1.0)

    def gamma_for(self, timesteps: torch.Tensor) -> torch.Tensor:
        """γ of each sample's bin, (batch,) float32, on the device of `timesteps`."""
        t = torch.as_tensor(timesteps)
        return self.gamma()[self.bin_of(t)].to(t.device)

    # ------------------------------------------------------------------ updates
    def update(self, timesteps, loss_prior, loss_ft, is_reg=None) -> None:
        """One EMA update per bin present in this micro-batch (non-reg samples only).

        `loss_prior` / `loss_ft`: per-sample losses (batch,), mean over latent elements, before any
        weighting. They are detached and copied to the CPU here.
        """
        bins, lp, lf, keep = self._rows(timesteps, loss_prior, loss_ft, is_reg)
        self._update_bins(bins, lp, lf, keep)

    def _rows(self, timesteps, loss_prior, loss_ft, is_reg):
        """(bins, L_φ, L_θ as float64, keep = not reg) on the indicator's device, checked for equal lengths."""
        bins = self.bin_of(timesteps)
        lp = torch.as_tensor(loss_prior).detach().to(self.device, torch.float64).reshape(-1)
        lf = torch.as_tensor(loss_ft).detach().to(self.device, torch.float64).reshape(-1)
        if is_reg is None:
            keep = torch.ones(bins.numel(), dtype=torch.bool, device=self.device)
        else:
            keep = ~torch.as_tensor(is_reg).detach().to(self.device).bool().reshape(-1)
        if not (bins.numel() == lp.numel() == lf.numel() == keep.numel()):
            raise ValueError(f"batch sizes differ: timesteps {bins.numel()}, loss_prior {lp.numel()}, "
                             f"loss_ft {lf.numel()}, is_reg {keep.numel()}")
        return bins, lp, lf, keep

    def _update_bins(self, bins: torch.Tensor, lp: torch.Tensor, lf: torch.Tensor, keep: torch.Tensor) -> None:
        # A non-finite loss (fp16 overflow) would poison the EMA for the rest of the run: leave it out.
        # Masked arithmetic, no boolean indexing or `if tensor`: the update never waits for the device.
        keep = (keep & torch.isfinite(lp) & torch.isfinite(lf)).to(torch.float64)
        lp, lf = torch.nan_to_num(lp) * keep, torch.nan_to_num(lf) * keep
        zeros = torch.zeros(self.num_bins, dtype=torch.float64, device=self.device)
        count = zeros.index_add(0, bins, keep)
        present = count > 0
        n = count.clamp(min=1.0)
        x_p = zeros.index_add(0, bins, lp) / n  # same-bin average
        x_f = zeros.index_add(0, bins, lf) / n
        a = self.ema_alpha
        upd = present & self.seen
        first = present & ~self.seen  # first observation initialises the EMA
        self.ema_prior = torch.where(upd, (1.0 - a) * self.ema_prior + a * x_p, torch.where(first, x_p, self.ema_prior))
        self.ema_ft = torch.where(upd, (1.0 - a) * self.ema_ft + a * x_f, torch.where(first, x_f, self.ema_ft))
        self.seen = self.seen | present
        self.bin_updates += present.long()
        self.step += 1

    def sync_update(self, accelerator, timesteps, loss_prior, loss_ft, is_reg=None) -> None:
        """`update` with the samples of every process, so that every rank holds the same state.

        With no accelerator or one process this is exactly `update`. Otherwise each rank packs
        (bin, L_φ, L_θ, keep) per sample into a fixed-size float64 tensor on `accelerator.device`
        (NCCL needs CUDA tensors, gloo CPU ones; bins are small integers, exact in float64), padded to
        `max_rows` (`APT` sets it to the datasets' largest batch size, known to every rank) or else to the
        largest batch of all ranks (one tiny all_reduce MAX first, which the host waits for: bucketed datasets can
        end an epoch with a short batch), all-gathers it, and applies one update with all rows in rank order.
        """
        if accelerator is None or getattr(accelerator, "num_processes", 1) <= 1:
            self.update(timesteps, loss_prior, loss_ft, is_reg)
            return
        import torch.distributed as dist

        bins, lp, lf, keep = self._rows(timesteps, loss_prior, loss_ft, is_reg)
        device = accelerator.device
        if self.max_rows is not None:  # the same bound on every rank: no need to ask the others
            if bins.numel() > self.max_rows:
                raise ValueError(f"a batch of {bins.numel()} samples, over max_rows={self.max_rows}")
            n = self.max_rows
        else:
            n = torch.tensor([bins.numel()], dtype=torch.int64, device=device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)  # a host-device sync: the padded size
            n = int(n.item())
        rows = torch.zeros(n, 4, dtype=torch.float64, device=device)  # padding rows have keep = 0
        rows[: bins.numel()] = torch.stack([bins.double(), lp, lf, keep.double()], dim=1).to(device)
        gathered = [torch.empty_like(rows) for _ in range(accelerator.num_processes)]
        dist.all_gather(gathered, rows)
        allrows = torch.cat(gathered).to(self.device)
        self._update_bins(allrows[:, 0].long(), allrows[:, 1], allrows[:, 2], allrows[:, 3] > 0.5)

    # ------------------------------------------------------------------ state and logs
    def state_dict(self) -> dict:
        """Plain CPU tensors only (scalars as 0-d int64), so torch.save and safetensors both work."""
        return {
            "ema_prior": self.ema_prior.cpu().clone(),
            "ema_ft": self.ema_ft.cpu().clone(),
            "seen": self.seen.cpu().clone(),
            "bin_updates": self.bin_updates.cpu().clone(),
            "step": torch.tensor(self.step, dtype=torch.int64),
            "num_bins": torch.tensor(self.num_bins, dtype=torch.int64),
            "num_train_timesteps": torch.tensor(self.num_train_timesteps, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`. α and τ are settings, not state: the current ones are kept."""
        nb = int(state["num_bins"]) if "num_bins" in state else int(torch.as_tensor(state["ema_prior"]).numel())
        nt = int(state.get("num_train_timesteps", self.num_train_timesteps))
        if nb != self.num_bins or nt != self.num_train_timesteps:
            raise ValueError(f"indicator state has {nb} bins over {nt} timesteps, this run uses "
                             f"{self.num_bins} over {self.num_train_timesteps}; resume with the same settings")
        d = self.device
        self.ema_prior = torch.as_tensor(state["ema_prior"]).detach().to(d, torch.float64).clone()
        self.ema_ft = torch.as_tensor(state["ema_ft"]).detach().to(d, torch.float64).clone()
        self.seen = torch.as_tensor(state["seen"]).detach().to(d).bool().clone()
        if "bin_updates" in state:
            self.bin_updates = torch.as_tensor(state["bin_updates"]).detach().to(d).long().clone()
        else:
            self.bin_updates = self.seen.long()
        self.step = int(state.get("step", 0))

    def log_tensor(self) -> torch.Tensor:
        """(4, bins): γ, seen, the prior and fine-tuned EMAs; what `logs` reads (copied ahead by the trainer)."""
        return torch.stack([self.gamma().double(), self.seen.double(), self.ema_prior.double(), self.ema_ft.double()])

    def logs(self, read: Optional[list] = None, prefix: str = "apt/") -> dict[str, float]:
        """Per-bin γ and EMAs of the seen bins, for the trainer's logger (the paper's Fig. 6). `read`:
        `log_tensor()` as read back earlier; default: read it now (one read of the device)."""
        g, seen, ep, ef = read if read is not None else self.log_tensor().tolist()
        out: dict[str, float] = {}
        for b in range(self.num_bins):
            if seen[b]:
                out[f"{prefix}gamma_bin{b}"] = g[b]
                out[f"{prefix}ema_prior_bin{b}"] = ep[b]
                out[f"{prefix}ema_ft_bin{b}"] = ef[b]
        return out

    def __repr__(self) -> str:
        g = ", ".join("-" if not s else f"{v:.3f}" for v, s in zip(self.gamma().tolist(), self.seen.tolist()))
        return (f"OverfittingIndicator(bins={self.num_bins}, T={self.num_train_timesteps}, alpha={self.ema_alpha}, "
                f"tau={self.temperature}, step={self.step}, gamma=[{g}])")

