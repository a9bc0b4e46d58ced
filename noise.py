"""The noise process of a model family, chosen by its scheduler config: DDPM (epsilon or v
prediction, optionally zero terminal SNR / CogVideoX's SNR shift) or flow matching (Wan2.1).

One object answers the questions the training loop asks, so that ``loop.training_step`` reads
the same for every family:
    sample_t(g)          -> (1,) long    training index t (uniform for DDPM; logit-normal for flows)
    q_sample(x0, t, eps) -> x_t          ``sspo.q_sample`` | ``flow.flow_q_sample``
    target(x0, eps, t)   -> target       eps or v (``sspo.training_target``) | eps - x0
    model_t(t)           -> timestep     what the network is called with: t itself (DDPM), or
                                         T * sigma_t (flows, as ``FlowMatchEulerDiscreteScheduler``)
    snr_weight(t, gamma) -> (B,) float32 min-SNR loss weight (``--snr_gamma``; DDPM only)
    importance_kappa(t)  -> (B,) float32 kappa_t of the DPO-C&M / SDPO weight
                                         (``importance.importance_coef`` | ``flow.flow_importance_kappa``),
                                         passed to ``importance.pair_log_weight``
Errors for every loss are ``sspo.per_sample_error(pred, target)``: noise / v errors for DDPM,
velocity errors for flows (flow.py, derivations 1-3). Pure tensor code; imports only the math.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import importance
import sspo
import flow

FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler",)


def is_flow(scheduler_config: dict) -> bool:
    """Flow matching when the config names a flow scheduler, or a UniPC / DPM-Solver with flow
    sigmas (how Wan2.1's release ships its scheduler: ``prediction_type="flow_prediction"``)."""
    return (scheduler_config.get("_class_name") in FLOW_CLASSES or bool(scheduler_config.get("use_flow_sigmas"))
            or scheduler_config.get("prediction_type") == "flow_prediction")


def flow_shift_of(scheduler_config: dict) -> float:
    """The static shift: ``shift`` (FlowMatchEulerDiscreteScheduler) or ``flow_shift`` (UniPC)."""
    if scheduler_config.get("use_dynamic_shifting"):
        raise ValueError("dynamic (resolution-dependent) shifting is not supported; use a static shift")
    key = "shift" if scheduler_config.get("_class_name") in FLOW_CLASSES else "flow_shift"
    return float(scheduler_config.get(key, 1.0))


@dataclass
class Process:
    kind: str                          # "ddpm" | "flow"
    num_timesteps: int                 # T
    prediction_type: str = "epsilon"   # ddpm: epsilon | v_prediction; flow: velocity (eps - x0)
    schedule: dict | None = None       # ddpm: sspo.make_schedule output (CPU)
    abar: torch.Tensor | None = None   # ddpm: (T,) alphas_cumprod on the device
    sigmas: torch.Tensor | None = None  # flow: (T,) increasing noise levels on the device

    @classmethod
    def from_config(cls, sc: dict, device: torch.device | str = "cpu") -> "Process":
        T = int(sc.get("num_train_timesteps", 1000))
        if is_flow(sc):
            return cls("flow", T, "flow", sigmas=flow.flow_sigmas(T, flow_shift_of(sc)).to(device))
        schedule = sspo.make_schedule(T, sc["beta_start"], sc["beta_end"], sc["beta_schedule"],
                                      rescale_betas_zero_snr=bool(sc.get("rescale_betas_zero_snr", False)),
                                      snr_shift_scale=sc.get("snr_shift_scale"))
        return cls("ddpm", T, sc.get("prediction_type", "epsilon"), schedule=schedule,
                   abar=schedule["alphas_cumprod"].to(device))

    def sample_t(self, generator: torch.Generator) -> torch.Tensor:
        """One training index, (1,) long: uniform on [0, T) for DDPM (DDPM / Diffusion-DPO);
        logit-normal(0, 1) on the unshifted time for flows ([SD3] Sec. 3.1, as Wan trains)."""
        if self.kind == "flow":
            return flow.flow_sample_timesteps(1, self.num_timesteps, generator=generator)
        return torch.randint(0, self.num_timesteps, (1,), generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.kind == "flow":
            return flow.flow_q_sample(x0, self.sigmas[t], eps)
        return sspo.q_sample(x0, t, eps, self.abar)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "flow":
            return flow.flow_target(x0, eps)
        return sspo.training_target(x0, eps, t, self.abar, self.prediction_type)

    def model_t(self, t: torch.Tensor) -> torch.Tensor:
        """The network's timestep input for index t: t (DDPM) or T * sigma_t (flow, float32)."""
        return self.sigmas[t] * self.num_timesteps if self.kind == "flow" else t

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar, (T,): what ``diffusers.training_utils.compute_snr`` reads of a scheduler."""
        return self.abar

    def snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weight (Hang et al. 2023) per training index t, as diffusers'
        train_text_to_image.py weights its per-sample MSE under ``--snr_gamma``: with
        SNR_t = abar_t / (1 - abar_t) (``diffusers.training_utils.compute_snr``),
        min(SNR_t, gamma) / SNR_t for an epsilon target and min(SNR_t, gamma) / (SNR_t + 1) for
        a v target (both = the x0-error weight min(SNR_t, gamma) in the target's units). At a
        zero-terminal-SNR step (SNR = 0) the epsilon weight takes its limit, 1. t: (B,) long;
        returns (B,) float32 on t's device, no gradient. Flow matching has no such weight here:
        refused in one line."""
        if self.kind == "flow":
            raise ValueError("min-SNR weighting needs a DDPM schedule (alphas_cumprod); a flow-matching "
                             "process has none: drop --snr_gamma")
        from diffusers.training_utils import compute_snr
        snr = compute_snr(self, t)  # (B,) float32
        clipped = torch.clamp(snr, max=gamma)  # = min(snr, gamma): diffusers stacks and takes the min
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return torch.where(snr > 0, clipped / snr.clamp_min(torch.finfo(snr.dtype).tiny), torch.ones_like(snr))

    def importance_kappa(self, t: torch.Tensor) -> torch.Tensor:
        """kappa_t with KL(q || p) = kappa_t ||target - pred||^2 for one reverse step at index t, in
        the units of this process's target (importance.py, item 2): DDPM eps or v
        (``importance.importance_coef``), or flow velocity over the table's step from sigmas[t]
        to sigmas[t-1] (``flow.flow_importance_kappa``, flow.py derivation 4). t: (B,) long;
        returns (B,) float32 on t's device, no gradient."""
        if self.kind == "flow":
            return flow.flow_importance_kappa(self.sigmas[t], flow.flow_sigma_next(t, self.sigmas)).to(t.device)
        return importance.importance_coef(t, self.schedule, self.prediction_type)


# Keyed draws: the same numbers for a dataset item whatever the world size, micro-batching or resume.

def pair_noise(seed: int, step: int, indices: torch.Tensor, shape: tuple, process: Process):
    """One (t, eps) per pair and the initial noise of its replayed sample, keyed by
    (seed, update, dataset index): the same numbers whatever the world size or micro-batching.
    Returns t (B,) long, eps (B,*shape), z_T (B,*shape)."""
    ts, eps, z = [], [], []
    for i in indices.tolist():
        g = torch.Generator().manual_seed(hash((seed, step, i)) & (2 ** 63 - 1))
        ts.append(process.sample_t(g))
        eps.append(torch.randn(shape, generator=g))
        z.append(torch.randn(shape, generator=g))
    return torch.cat(ts), torch.stack(eps), torch.stack(z)


def vae_generators(seed: int, step: int, indices: torch.Tensor, purpose: int) -> list:
    """Per-item generators of the VAE posterior noise of winners (1) / losers (2), as pair_noise."""
    return [torch.Generator().manual_seed(hash((seed, step, i, purpose)) & (2 ** 63 - 1)) for i in indices.tolist()]
