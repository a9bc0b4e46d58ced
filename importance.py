"""Importance-sampled Diffusion-DPO: DPO-C&M and SDPO, as pure functions of tensors.

[SDPO] SDPO: Importance-Sampled Direct Preference Optimization for Stable Diffusion Training,
arXiv 2505.21893. Only its abstract is available to this project, and its v2 (2025-09-25)
carries the authors' notice of "a critical error in the main theorem and proof design". What
follows is this project's reading, derived here, not the authors' method or code. Symbols as in
sspo.py's glossary.

What the [SDPO] abstract says: Diffusion-DPO suffers from "timestep-dependent instability" and
from "off-policy bias arising from the mismatch between optimization and data collection
policies"; "instability primarily occurs at early timesteps with low importance weights";
DPO-C&M improves stability "by clipping and masking uninformative timesteps"; SDPO
"incorporates importance sampling into the objective". Everything below is this project's
reading, derived here because the paper's is not available.

1. Behaviour policy b (who collected the data). For self-sampled losers (SSPO, SPIN) b is known
   exactly: the replayed checkpoint, which is also the reference network. For Pick-a-Pic pairs
   (and the digits pairs) the generators are unknown and the reference model stands in for b.
   Either way b's prediction is the reference's, so r_w, r_l are b's errors.
2. The ratio: per reverse step, w_t = p_theta(x_{t-1} | x_t) / p_b(x_{t-1} | x_t). Both are DDPM
   reverse steps: Gaussians with the same variance sigma_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t)
   and means mu(eps_hat) = (x_t - beta_t / sqrt(1 - abar_t) eps_hat) / sqrt(alpha_t). As
   Diffusion-DPO does for its loss, x_{t-1} is taken from the forward posterior
   q(x_{t-1} | x_t, x0) = N(mu(eps), sigma_t^2), and the log ratio is averaged over that draw (which
   removes a zero-mean noise term and leaves a difference of two Gaussian KLs; exp of it is a
   biased, lower-variance stand-in for the ratio):
       E_q[log w_t] = KL(q || p_b) - KL(q || p_theta)
                    = -lambda_t (||eps - eps_theta||^2 - ||eps - eps_b||^2),
       lambda_t = beta_t / (2 alpha_t (1 - abar_{t-1}))   (mu(eps) - mu(eps_hat) is
       beta_t / sqrt(alpha_t (1 - abar_t)) (eps_hat - eps), and KL = ||mean gap||^2 / (2 sigma_t^2)).
   The *difference* of policy and behaviour errors enters, not the raw policy error: -lambda_t
   ||eps - eps_theta||^2 alone is log p_theta / q, a comparison with the forward posterior, which
   no policy sampled from; it is < 1 even on-policy (theta = b, where the right weight is exactly
   1) and measures how ambiguous denoising is at t (KL(q || p_theta) is mostly irreducible), not
   how far the policy has drifted from the data's generator.
3. Dimensions: a Gaussian log-density sums over all D values of a sample (D = C*H*W: 64 pixels
   for the digits model, 16,384 latent values for SD-1.5 at 512 px; C*F*H*W for video), so with
   per-value mean errors m, r:  log w_t = -lambda_t * D * (m - r). No temperature is applied:
   this is the ratio's own scale. (The per-value mean, i.e. dividing by D, has no derivation
   behind it; it shrank |log w| 16,384-fold for SD-1.5 and left every weight near 1.) The scale
   is usable because a fine-tuned policy's per-value gap m - r is small except near the data,
   so w departs from 1 mostly at small t (measured in results/pair_weights.md); tau and the
   clip bound the rest, and |log w| is capped at LOG_WEIGHT_CAP = 60 so exp() never overflows.
4. A pair's weight is w_w * w_l (both images come from b and share t and eps):
       log w_pair = -lambda_t * D * ((m_w - r_w) + (m_l - r_l)).
5. Parametrisations. v-prediction: eps - eps_hat = sqrt(abar_t) (v - v_hat) at fixed x_t, so the
   coefficient of a v error is lambda_t abar_t = beta_t abar_{t-1} / (2 (1 - abar_{t-1})), written
   without alpha_t: finite at the last step of a zero-terminal-SNR schedule (alpha_T = abar_T = 0),
   where the eps coefficient is infinite. An epsilon model has no reverse mean at alpha_t = 0:
   the coefficient is set to 0 there (weight 1, no correction). At t = 0, abar_{-1} := abar_0
   (sigma_0^2 = beta_0 rather than 0, DDPM's "large" variance at that one step). Deterministic
   samplers (DDIM with eta = 0, which makes this codebase's replayed losers) have no transition
   density; the weight refers to the stochastic DDPM reverse process that Diffusion-DPO's bound
   uses. Flow matching (noise.py): the same reading, log w = -kappa * D * (m - r) on velocity
   errors, with sspo_flow's posterior-step coefficient kappa in place of lambda_t.
6. Where w is low: where the policy denoises the pair worse than b (m - r > 0 over the pair:
   the policy has moved away from the data's generator), amplified where lambda_t is large:
   near the data the reverse step's noise sigma_t is tiny, so the same prediction gap separates
   the two transition densities far more. For SD-1.5's schedule lambda_t ~ 1/(2t) there (0.5 at
   t = 0, 1; 0.05 at t = 10) and 0.003-0.007 for t >= 100. At large t (the early, noisy reverse
   steps) lambda_t is small and both networks predict eps almost exactly, so w stays near 1.
   This reading places low (and high) weights at the *late* reverse steps, small t, not at the
   early ones where the [SDPO] abstract reports low weights; it does not reproduce that
   statement. Measured (research/pair_weights.py): after short Diffusion-DPO fine-tunes w < 1 for
   most pairs (DPO raised the policy's error on both images) and falls well below 1 only for
   t < ~100 (digits) or ~200 (SD-1.5's latent shape).
7. Use: DPO-C&M masks pairs with w < tau (zero loss and gradient: too far off-policy) and clips
   the kept weights into [1 - eps_clip, 1 + eps_clip], as PPO clips its ratio; SDPO weights each
   kept pair's DPO loss by its clipped weight, self-normalised to mean 1 over the kept pairs.
   Weights never carry gradient.
"""
from __future__ import annotations

import torch

from sspo import _check_pairs, dpo_loss

# |log w| is capped here before exp(): float32 exp overflows at 88.7, and 60 keeps
# B * exp(60) far below float32's max, so sdpo_loss's normalisation stays finite even unclipped.
LOG_WEIGHT_CAP = 60.0


def importance_coef(t: torch.Tensor, schedule: dict, prediction_type: str = "epsilon") -> torch.Tensor:
    """kappa_t with KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) = kappa_t * ||target - pred||^2 (summed).

    p is a DDPM reverse step whose mean comes from the network's prediction and whose variance is
    the posterior one, sigma_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t) (module docstring, item 2):
      "epsilon":      kappa_t = lambda_t = beta_t / (2 alpha_t (1 - abar_{t-1}))
      "v_prediction": kappa_t = lambda_t abar_t = beta_t abar_{t-1} / (2 (1 - abar_{t-1})),
                      since eps - eps_hat = sqrt(abar_t) (v - v_hat) at fixed x_t.
    The v form has no alpha_t in a denominator, so it stays finite at the last step of a
    zero-terminal-SNR schedule (alpha_T = abar_T = 0). An epsilon model has no reverse mean at
    alpha_t = 0: kappa_t = 0 there (weight 1, no correction). At t = 0, abar_{-1} := abar_0, i.e.
    sigma_0^2 = beta_0 instead of 0 (DDPM's "large" variance at that one step).
    t: (B,) long. Returns (B,) float32, on t's device; computed in float64.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    betas, alphas, abar = (schedule[k].double() for k in ("betas", "alphas", "alphas_cumprod"))
    abar_prev = torch.cat([abar[:1], abar[:-1]])  # abar_{t-1}, with abar_{-1} := abar_0; (T,)
    if prediction_type == "epsilon":
        coef = betas / (2 * alphas * (1 - abar_prev))  # inf where alpha_t = 0
    else:
        coef = betas * abar_prev / (2 * (1 - abar_prev))
    coef = torch.where(torch.isfinite(coef), coef, torch.zeros_like(coef))  # (T,)
    return coef.float().to(t.device)[t]


def importance_log_weight(model_err: torch.Tensor, ref_err: torch.Tensor, t: torch.Tensor,
                          schedule: dict, num_values: int,
                          prediction_type: str = "epsilon") -> torch.Tensor:
    """log w_t of one sample, w_t = p_theta(x_{t-1}|x_t) / p_b(x_{t-1}|x_t) (this project's reading).

        log w_t = -kappa_t * D * (m - r)          (module docstring, items 2-3)

    the expected log ratio of the policy's and the behaviour policy's reverse step over
    x_{t-1} ~ q(x_{t-1}|x_t, x0), = KL(q || p_b) - KL(q || p_theta). The reference network
    stands in for the behaviour policy b (it *is* b for self-sampled losers).
    model_err, ref_err: (B,) per-value mean errors (:func:`per_sample_error`) of the policy and
    the reference on the same x_t; t: (B,) long; num_values: D, the values per sample that
    the errors average over (C*H*W, or C*F*H*W for video), which turns means back into the
    sums a Gaussian log-density holds. Sign: w < 1 where the policy fits the sample worse than
    the reference (m > r); policy == reference gives exactly 0 (w = 1).
    Returns (B,) float32, detached (weights never carry gradient), capped to +-LOG_WEIGHT_CAP.
    """
    if num_values < 1:
        raise ValueError(f"num_values must be >= 1, got {num_values}")
    with torch.no_grad():
        gap = model_err.detach().float() - ref_err.detach().float()  # m - r, (B,)
        log_w = -importance_coef(t, schedule, prediction_type).to(gap.device) * num_values * gap
        return log_w.clamp(-LOG_WEIGHT_CAP, LOG_WEIGHT_CAP)


def pair_log_weight(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                    ref_err_l: torch.Tensor, t: torch.Tensor, schedule: dict, num_values: int,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """log of a pair's weight w_w * w_l (both images come from the behaviour policy; same t, eps):

        log w_pair = -kappa_t * D * ((m_w - r_w) + (m_l - r_l))

    Args as :func:`importance_log_weight`, errors (B,) each. Returns (B,) float32, detached,
    capped to +-LOG_WEIGHT_CAP.
    """
    m_w, m_l, r_w, r_l = _check_pairs(model_err_w, model_err_l, ref_err_w, ref_err_l)
    log_w = (importance_log_weight(m_w, r_w, t, schedule, num_values, prediction_type)
             + importance_log_weight(m_l, r_l, t, schedule, num_values, prediction_type))
    return log_w.clamp(-LOG_WEIGHT_CAP, LOG_WEIGHT_CAP)


def _clipped_weights(log_weight: torch.Tensor, tau: float, eps_clip: float):
    """w = exp(log_weight), keep = w >= tau, w clipped into [1 - eps_clip, 1 + eps_clip], and
    which kept weights the clip changed. All (B,), no gradient."""
    with torch.no_grad():
        w = log_weight.detach().float().clamp(-LOG_WEIGHT_CAP, LOG_WEIGHT_CAP).exp()  # (B,)
        keep = w >= tau
        clipped = w.clamp(1.0 - eps_clip, 1.0 + eps_clip)  # eps_clip = inf: no clipping
        was_clipped = keep & (clipped != w)
        return w, keep, clipped, was_clipped


def _weight_metrics(w, keep, was_clipped) -> dict:
    kept = keep.float().sum()
    return {"mask_rate": (~keep).float().mean(), "mean_weight": w.mean(),
            "clip_rate": was_clipped.float().sum() / kept.clamp_min(1.0)}


def dpo_cm_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                ref_err_l: torch.Tensor, log_weight: torch.Tensor, beta: float = 5000.0, *,
                tau: float, eps_clip: float) -> tuple[torch.Tensor, dict]:
    """DPO-C&M ("clip and mask"), this project's reading of [SDPO] (only its abstract is known).

        w    = exp(log_weight)                      pair weight w_w * w_l (:func:`pair_log_weight`)
        loss = 1[w >= tau] * clip(w, 1 - eps_clip, 1 + eps_clip) * dpo_loss

    Pairs whose weight is below ``tau`` (the policy has drifted far from the policy that made
    them) are masked: zero loss and zero gradient. Kept weights are clipped into a band around 1,
    as PPO clips its ratio. No gradient flows into w. Identities: log_weight = 0 (all weights 1)
    gives Diffusion-DPO; tau = 0 with eps_clip = inf gives plain importance weighting w * dpo_loss.

    Args: four per-sample errors (B,) as in :func:`dpo_loss`; log_weight (B,); beta as in
    :func:`dpo_loss`; tau >= 0; eps_clip >= 0 (defaults: config.METHODS).
    Returns per-sample losses (B,) (zero where masked) and metrics incl. "mask_rate" (fraction
    of pairs masked), "clip_rate" (fraction of kept pairs whose weight the clip changed) and
    "mean_weight" (mean unclipped w).
    """
    base, metrics = dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    w, keep, clipped, was_clipped = _clipped_weights(log_weight, tau, eps_clip)
    loss = torch.where(keep, clipped * base, torch.zeros_like(base))  # masked: no loss, no grad
    metrics.update(_weight_metrics(w, keep, was_clipped))
    return loss, metrics


def sdpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
              ref_err_l: torch.Tensor, log_weight: torch.Tensor, beta: float = 5000.0, *,
              tau: float, eps_clip: float) -> tuple[torch.Tensor, dict]:
    """SDPO, this project's reading of [SDPO]: importance-weighted Diffusion-DPO.

        w~   = clip(w, 1 - eps_clip, 1 + eps_clip) on pairs with w >= tau (others masked)
        loss = w~ / mean_{kept}(w~) * dpo_loss    (self-normalised over the kept pairs)

    Identities: all weights 1 gives Diffusion-DPO; tau = 0 and eps_clip = inf gives plain
    self-normalised importance weighting. Masked pairs: zero loss, zero gradient; no gradient
    flows into the weights. The weights average 1 over the kept pairs of the local batch (under
    DDP, each process's micro-batch); a caller's ``.mean()`` over all B pairs then scales the
    loss by the kept fraction, as masking in DPO-C&M does.
    Args and returns as :func:`dpo_cm_loss` (defaults: config.METHODS['sdpo']).
    """
    base, metrics = dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    w, keep, clipped, was_clipped = _clipped_weights(log_weight, tau, eps_clip)
    with torch.no_grad():
        kept = clipped * keep.float()
        norm = kept.sum() / keep.float().sum().clamp_min(1.0)  # mean over kept pairs
        weight = kept / norm.clamp_min(torch.finfo(torch.float32).tiny)
    loss = torch.where(keep, weight * base, torch.zeros_like(base))
    metrics.update(_weight_metrics(w, keep, was_clipped))
    return loss, metrics
