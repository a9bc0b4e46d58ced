"""Flow matching (Wan2.1 and other rectified-flow models) beside the DDPM math of ``sspo.py``.

Pure functions of tensors, as in ``sspo.py``. The losses do not change: ``sspo.sft_loss``,
``dpo_loss``, ``sspo_loss``, ``dpo_cm_loss`` and ``sdpo_loss`` take per-sample errors, and for a
flow model those are velocity errors ``sspo.per_sample_error(v_pred, flow_target(x0, eps))``.
What is per-parametrisation lives here: the forward process, the target, the timestep density,
an optional per-timestep weight, the importance weight's coefficient kappa, and the Euler step of the sampler.

Papers
------
[FM]   Lipman et al., Flow Matching for Generative Modeling, ICLR 2023: the conditional flow
       matching (CFM) objective (Sec. 3.2) and its optimal-transport path (Sec. 4.1), here with
       sigma_min = 0.
[RF]   Liu, Gong & Liu, Flow Straight and Fast: Learning to Generate and Transfer Data with
       Rectified Flow, ICLR 2023: min_v E || (X1 - X0) - v(X_t, t) ||^2, X_t = t X1 + (1-t) X0.
[SD3]  Esser et al., Scaling Rectified Flow Transformers for High-Resolution Image Synthesis,
       ICML 2024 (arXiv 2403.03206): every objective as a weighted ELBO (Sec. 2; the velocity
       loss has weight w_t = t / (1 - t)), logit-normal timestep sampling (Sec. 3.1), shifted
       timestep schedules for high resolution (Sec. 5.3.2).
[Wan]  Wan: Open and Advanced Large-Scale Video Generative Models, arXiv 2503.20314 (Wan2.1):
       trained as a rectified flow with the velocity loss, t drawn from a logit-normal density.
       diffusers' Wan docs sample with flow_shift 3.0 at 480p and 5.0 at 720p.
[VDM]  Kingma et al., Variational Diffusion Models, NeurIPS 2021: the KL of one reverse step,
       1/2 (SNR(s) - SNR(t)) ||x0 - x0_hat||^2, and the ELBO in terms of log-SNR.
[DDIM] Song et al., Denoising Diffusion Implicit Models, ICLR 2021: the eta family of samplers.
[DDPO] Wallace et al., Diffusion-DPO, CVPR 2024, eq. 14 (the weight omega(lambda_t)).
[SDPO] arXiv 2505.21893; only its abstract is known: the importance weight is this project's
       reading (derived in importance.py), carried over to flows in derivation 4.

Glossary of symbols
-------------------
sigma          noise level in [0, 1]: 0 is data, 1 is pure noise; one per pair, shape (B,)
T, t           training table size (1000) and integer index into it, (B,) long. Here t grows
               with the noise, as in the DDPM code: sigmas[t] = shift((t+1)/T). diffusers'
               ``FlowMatchEulerDiscreteScheduler.sigmas`` holds the same table in reverse order.
shift          timestep shift s: sigma' = s sigma / (1 + (s - 1) sigma) (SNR divided by s^2)
x0, eps        clean sample (VAE latents, (B,C,F,H,W) for video) and standard Gaussian noise
x_t            (1 - sigma) x0 + sigma eps                                         (q(x_t | x0))
v              eps - x0 = d x_t / d sigma, the velocity the network regresses (Wan's "flow")
v_hat          the network's prediction of v at (x_t, sigma); the model's timestep input is
               T * sigma (``scheduler.timesteps``)
SNR(sigma)     (1 - sigma)^2 / sigma^2; log-SNR lambda(sigma) = 2 log((1 - sigma) / sigma)
kappa          KL per unit of squared velocity error of one reverse step (importance weight)
_w, _l, m_, r_ as in ``sspo.py``: winner / loser, policy errors / reference errors, (B,)

Time direction: [RF] and [FM] run t from noise (0) to data (1), so their t is 1 - sigma and
their velocity X1 - X0 is -v; the square in the loss is the same. Wan writes x_t = t x1 +
(1 - t) x0 with x1 the noise, which is this file's convention with t = sigma.

Derivations
-----------
1. SFT is the rectified-flow / CFM objective. With sigma ~ p(sigma) (:func:`flow_sample_timesteps`)
   the per-sample error m = mean_d (v_hat(x_t, sigma) - (eps - x0))^2 averaged over the batch is
   [RF]'s objective with X0 = eps, X1 = x0, t = 1 - sigma, and [FM]'s CFM loss on the OT path
   with sigma_min = 0 (conditional velocity x0 - eps in their time), divided by the number of
   values. Its gradient equals that of the marginal flow-matching loss ([FM] Thm. 2), so the
   minimiser is E[eps - x0 | x_t]. Hence ``sspo.sft_loss`` on velocity errors is Wan's own loss.

2. What replaces lambda_t. A flow is a Gaussian diffusion with signal scale 1 - sigma and noise
   scale sigma. At fixed x_t the three parametrisations differ by constants:
       eps - eps_hat = (1 - sigma)(v - v_hat),      x0 - x0_hat = -sigma (v - v_hat).
   [DDPO] builds its loss from per-step ELBO terms T omega(lambda_t) ||eps - eps_theta||^2 and
   takes omega constant, which makes each term the model's pretraining loss (eps MSE for SD-1.5).
   For a flow the exact ELBO integrand is -1/2 dlambda/dsigma ||eps - eps_hat||^2 =
   (1 - sigma)/sigma ||v - v_hat||^2 ([VDM]; [SD3] Sec. 2), unbounded as sigma -> 0, and a
   constant omega on eps errors would be a (1 - sigma)^2 factor on velocity errors. This project
   uses weight 1 on velocity errors: the same rule as [DDPO] (each term is the model's own
   pretraining loss, here Wan's velocity MSE, which is the ELBO with [SD3]'s w = sigma/(1-sigma)),
   and the same thing ``sspo.py`` does for v-prediction DDPM models, whose v errors are used as
   they are. So the losses of ``sspo.py`` are reused unchanged on velocity errors.
   :func:`flow_loss_weight` gives the (1 - sigma)^2 factor as an ablation ("eps").

3. What beta means. ``inside = -beta/2 ((m_w - m_l) - (r_w - r_l))`` with velocity errors; beta
   absorbs T omega and the per-dimension mean as before. The same number is not the same strength:
   a velocity error is 1/(1 - sigma)^2 times the eps error at the same x_t, and v = eps - x0 has
   per-value variance 1 + Var(x0) where eps has 1. Choose beta per model family (sspo.py, "Beta convention").

4. Importance weight ([SDPO] reading of importance.py, carried over). The Euler ODE step is
   deterministic, so p_theta(x_s | x_t) is a point mass and has no density ratio. The weight is
   read on the stochastic sampler of the same flow whose step is the forward process's Gaussian
   posterior q(x_s | x_t, x0) (ancestral sampling, [DDIM] eta = 1; the Euler step is eta = 0,
   :func:`flow_euler_step`), with p(x_s | x_t) = q(x_s | x_t, x0_hat), x0_hat = x_t - sigma_t v_hat,
   from sigma_t to sigma_s < sigma_t. All three Gaussians share their variance, and
       KL(q || p) = 1/2 (SNR(sigma_s) - SNR(sigma_t)) ||x0 - x0_hat||^2 = kappa ||v - v_hat||^2,
       kappa = (sigma_t - sigma_s)(sigma_t + sigma_s - 2 sigma_t sigma_s) / (2 sigma_s^2)
   (:func:`flow_importance_kappa`), importance.py's lambda_t for DDPM under the change of
   variables. The mean of a step is linear in v_hat, so importance.py's item 2 applies as it
   stands: log E_q[w] = 2 kappa D mean((v - v_b) * (v_theta - v_b)) against the reference's
   (behaviour policy's) velocity v_b, summed over all D values, winner and loser, then capped:
   ``importance.pair_log_weight`` with ``noise.Process.importance_kappa``.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# Noise levels: the shifted table and the training density
# ---------------------------------------------------------------------------------------------


def flow_shift(sigma: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """Timestep shift  sigma' = shift * sigma / (1 + (shift - 1) * sigma)  ([SD3] Sec. 5.3.2).

    Keeps 0 and 1 fixed and multiplies the noise-to-signal ratio sigma / (1 - sigma) by
    ``shift`` (SNR by 1/shift^2): shift > 1 spends more steps at high noise (Wan2.1: 3.0 at
    480p, 5.0 at 720p). Same formula as ``FlowMatchEulerDiscreteScheduler`` with a static shift.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_sigmas(num_train_timesteps: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """The training table of noise levels, (T,) float32, increasing: sigmas[t] = shift((t+1)/T).

    Equal to ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift).sigmas``
    flipped (diffusers stores it from noise to data). sigmas[T-1] = 1 (pure noise); the smallest
    entry is shift(1/T) > 0, so sigma = 0 never occurs in training. The model's timestep input
    for index t is T * sigmas[t].
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    steps = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float32)
    return flow_shift(steps / num_train_timesteps, shift)


FLOW_DENSITIES = ("logit_normal", "uniform")


def flow_sample_timesteps(batch_size: int, num_train_timesteps: int = 1000,
                          density: str = "logit_normal", logit_mean: float = 0.0,
                          logit_std: float = 1.0, generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw training indices t, (B,) long in [0, T), for the table of :func:`flow_sigmas`.

    u ~ density on (0, 1), then t = floor(u T), so sigma = sigmas[t] = shift(u rounded up to the
    grid): the density acts on the unshifted time and the table's shift is applied on top.
      "logit_normal": u = sigmoid(n), n ~ N(logit_mean, logit_std^2) ([SD3] Sec. 3.1; its best
                      setting is mean 0, std 1; [Wan] samples t from a logit-normal). The default.
      "uniform":      u ~ U(0, 1), the density of [RF] and [FM].
    logit_mean > 0 favours noisier steps, as in [SD3], where t is the noise level. (diffusers'
    SD3/Flux training scripts index the scheduler's noise-to-data table with u, which flips the
    sign of logit_mean there; with mean 0 the two agree.) Shift 1 gives [SD3]'s plain lognorm.
    """
    if density not in FLOW_DENSITIES:
        raise ValueError(f"density must be one of {FLOW_DENSITIES}, got {density!r}")
    if density == "logit_normal":
        n = torch.randn(batch_size, generator=generator, device=device)
        u = torch.sigmoid(logit_mean + logit_std * n)
    else:
        u = torch.rand(batch_size, generator=generator, device=device)
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)  # (B,)


# ---------------------------------------------------------------------------------------------
# Forward process, target, and the conversions between parametrisations
# ---------------------------------------------------------------------------------------------


def _per_sample(s, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A float, a 0-d tensor or a (B,) tensor as (B,1,...,1) (or 0-d) against ``like``."""
    s = torch.as_tensor(s, dtype=dtype or like.dtype, device=like.device)
    if s.ndim == 0:
        return s
    if s.ndim != 1 or s.shape[0] != like.shape[0]:
        raise ValueError(f"sigma must be a scalar or shape ({like.shape[0]},), got {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B,1,...,1)


def flow_q_sample(x0: torch.Tensor, sigma, eps: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps: the straight path from data to noise ([RF], [FM] OT path).

    x0, eps: (B, ...) any trailing dims; sigma: (B,) or scalar in [0, 1]. x_t = x0 at sigma = 0
    and eps at sigma = 1, with no division anywhere. Arithmetic as
    ``FlowMatchEulerDiscreteScheduler.scale_noise`` (sigma cast to x0's dtype first).
    """
    s = _per_sample(sigma, x0)
    return s * eps + (1.0 - s) * x0


def flow_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """What the network regresses: the velocity v = eps - x0 = d x_t / d sigma (independent of sigma).

    Sign: the sampler moves from sigma = 1 to 0 with x <- x + (sigma_next - sigma) v, i.e. against
    v, towards the data. [RF]'s X1 - X0 (data minus noise) is -v.
    """
    return eps - x0


def flow_x0_from_v(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = x_t - sigma v (the model's clean-sample estimate). Finite for every sigma in [0, 1]."""
    return x_t - _per_sample(sigma, x_t) * v


def flow_eps_from_v(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """eps = x_t + (1 - sigma) v (the model's noise estimate). Finite for every sigma in [0, 1].

    At fixed x_t, eps - eps_hat = (1 - sigma)(v - v_hat): the link between eps and velocity
    errors used in the module docstring (derivation 2).
    """
    return x_t + (1.0 - _per_sample(sigma, x_t)) * v


FLOW_WEIGHTINGS = ("none", "eps")


def flow_loss_weight(sigma: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """Per-timestep factor on velocity errors, (B,) float32, no gradient (derivation 2).

      "none": 1. The project's choice: velocity errors as they are, i.e. Wan's own training
              loss, as [DDPO] uses SD-1.5's own eps loss with omega(lambda_t) constant.
      "eps":  (1 - sigma)^2, which turns a velocity error into the eps error at the same x_t
              (eps - eps_hat = (1 - sigma)(v - v_hat)): [DDPO]'s loss read literally on eps.
    Use as ``err * flow_loss_weight(sigma, ...)`` for policy and reference errors alike, before
    any loss of ``sspo.py``. Bounded in [0, 1] for sigma in [0, 1].
    """
    if weighting not in FLOW_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {FLOW_WEIGHTINGS}, got {weighting!r}")
    sigma = torch.as_tensor(sigma, dtype=torch.float32).detach()
    if weighting == "none":
        return torch.ones_like(sigma)
    return (1.0 - sigma) ** 2


# ---------------------------------------------------------------------------------------------
# The sampler's step
# ---------------------------------------------------------------------------------------------


def flow_euler_step(x_t: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = v:  x_s = x_t + (sigma_s - sigma_t) v.

    Equal to ``FlowMatchEulerDiscreteScheduler.step`` (deterministic mode) on float32 tensors;
    computed in float32 and returned in v's dtype. It is also [DDIM] with eta = 0 on this process:
    x_s = (1 - sigma_s) x0_hat + sigma_s eps_hat with the estimates of :func:`flow_x0_from_v` and
    :func:`flow_eps_from_v`. sigma, sigma_next: scalars or (B,) tensors; x_t, v: (B, ...).
    """
    dt = (_per_sample(sigma_next, x_t, torch.float32) - _per_sample(sigma, x_t, torch.float32))
    return (x_t.float() + dt * v.float()).to(v.dtype)


# ---------------------------------------------------------------------------------------------
# Importance weight of DPO-C&M / SDPO for a flow (this project's reading; derivation 4)
# ---------------------------------------------------------------------------------------------


def flow_sigma_next(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The table's next (less noisy) level: sigmas[t-1], and 0 for t = 0 (the last step lands on
    the data, as diffusers' sampler appends sigma = 0). t: (B,) long; sigmas: (T,). Returns (B,)."""
    prev = torch.cat([sigmas.new_zeros(1), sigmas[:-1]])  # (T,) -> (T,): prev[t] = sigmas[t-1]
    return prev.to(t.device)[t]


def flow_importance_kappa(sigma: torch.Tensor, sigma_next, sigma_min: float = 1e-3) -> torch.Tensor:
    """kappa = 1/2 (SNR(sigma_s) - SNR(sigma_t)) sigma_t^2, (B,) float32 (derivation 4).

    Written without SNR's divisions by sigma_t:
        kappa = (sigma_t - sigma_s)(sigma_t + sigma_s - 2 sigma_t sigma_s) / (2 sigma_s^2) >= 0.
    Ends: both levels are first clamped to [sigma_min, 1] and sigma_s to at most sigma_t. The
    posterior of a step that lands on the data (sigma_s = 0) is a point mass, so that step is
    read as landing on sigma_min, as ``importance.importance_coef`` reads abar_{-1} as abar_0; at
    sigma_t = 0 (or sigma_s = sigma_t) no step is taken and kappa = 0; at sigma_t = 1,
    SNR(1) = 0 and kappa = SNR(sigma_s) / 2. Finite for all sigma in [0, 1].
    """
    s_t = torch.as_tensor(sigma, dtype=torch.float32).detach().clamp(sigma_min, 1.0)
    s_s = torch.as_tensor(sigma_next, dtype=torch.float32, device=s_t.device).detach()
    s_s = torch.minimum(s_s.clamp(sigma_min, 1.0), s_t)
    return (s_t - s_s) * (s_t + s_s - 2 * s_t * s_s) / (2 * s_s ** 2)
