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
"incorporates importance sampling into the objective".

1. Behaviour policy b (who collected the data). For self-sampled losers (SSPO, SPIN) b is known
   exactly: the replayed checkpoint, which is also the reference network. For Pick-a-Pic pairs
   (and the digits pairs) the generators are unknown and the reference model stands in for b.
   Either way b's prediction is the reference's.
2. The ratio of one reverse step, w = p_theta(x_{t-1} | x_t) / p_b(x_{t-1} | x_t). Both are
   Gaussians with the same variance s^2 and means mu(pred) linear in the network's prediction,
   mu(pred) - mu(target) = -c_t (pred - target) (DDPM: c_t = beta_t / sqrt(alpha_t (1 - abar_t))
   for eps). As Diffusion-DPO does for its loss, x_{t-1} is drawn from the forward posterior
   q(x_{t-1} | x_t, x0) = N(mu(target), s^2). Write e_b = target - pred_b and
   delta = pred_theta - pred_b (per value), kappa_t = c_t^2 / (2 s^2), so that
   KL(q || p) = kappa_t ||target - pred||^2 (:func:`importance_coef`; flows: flow.py,
   derivation 4). Then log w is Gaussian in x_{t-1} and
       E_q[w]       = exp(2 kappa_t <e_b, delta>)                                 (exact)
       log E_q[w]   = 2 kappa_t D mean(e_b * delta)
                    = -kappa_t D (m - r) + kappa_t D mean(delta^2),
       E_q[log w]   = -kappa_t D (m - r) = KL(q || p_b) - KL(q || p_theta),
   with m, r the per-value mean errors of policy and reference and D the values per sample (a
   Gaussian log-density sums over all of them). The weight used here is log E_q[w]: the
   expected ratio itself. exp(E_q[log w]) = E_q[w] exp(-kappa_t D mean(delta^2)) is biased low
   by a factor that any drift of the policy, in any direction, pushes below 1; it is not used.
   The same formula holds for eps, v and flow-velocity predictions with the matching kappa_t.
   It is computed as written in the first form, from one float32 cross term per sample
   (:func:`cross_term`), not as a difference of two nearly equal errors.
3. What it means. Relative to the reference, Diffusion-DPO's implicit reward of an image is
   R = -(m - r) (times beta/2), so E_q[log w] = kappa_t D (R_w + R_l) / (beta/2) per pair: up to
   the drift term, the weight is exp(c_t (R_w + R_l)) in the logged implicit rewards, with
   c_t = 2 kappa_t D / beta. Masking and clipping it is a trust region on the pair's reward
   sum; it does not correct for the generators that made Pick-a-Pic (which stay unknown).
4. Where it acts. kappa_t is largest near the data (small t: the reverse step's noise s_t is
   tiny, so a small prediction gap separates the two densities far more) and smallest at the
   noisy, early reverse steps, where both networks predict almost alike. This reading therefore
   puts low (and high) weights at the *late* reverse steps, small t, and cannot put them at the
   early noisy steps where the [SDPO] abstract reports low weights.
5. A pair's weight is w_w * w_l (both images share t and eps): the two per-image terms are
   summed, and the sum is capped once to +-LOG_WEIGHT_CAP (capping each term before summing
   would let opposite-sign terms beyond the cap cancel). An optional per-family temperature
   multiplies the log (w^temperature, a tempered weight; 1 = the ratio's own scale), and a sum
   below the rounding floor of the predictions (:func:`rounding_floor`) is treated as 0.
6. Use: DPO-C&M masks pairs with w < tau (zero loss and gradient) and clips the kept weights
   into [1 - eps_clip, 1 + eps_clip], as PPO clips its ratio; SDPO weights each kept pair's DPO
   loss by its clipped weight over the mean kept clipped weight of the whole update (all
   grad_accum micro-batches of all processes: loop.update computes it in a first, gradient-free
   pass). Weights never carry gradient.
"""
from __future__ import annotations

import torch

from sspo import _check_pairs, dpo_loss

# |log w| of a pair is capped here, once, after the winner's and loser's terms are summed:
# float32 exp overflows at 88.7, and 60 keeps a sum of exp(60) over any batch finite.
LOG_WEIGHT_CAP = 60.0


def importance_coef(t: torch.Tensor, schedule: dict, prediction_type: str = "epsilon") -> torch.Tensor:
    """kappa_t of a DDPM step: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) = kappa_t ||target - pred||^2 (summed).

    p is a DDPM reverse step whose mean comes from the network's prediction and whose variance is
    the posterior one, sigma_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t) (module docstring, item 2):
      "epsilon":      kappa_t = lambda_t = beta_t / (2 alpha_t (1 - abar_{t-1}))
      "v_prediction": kappa_t = lambda_t abar_t, since eps - eps_hat = sqrt(abar_t) (v - v_hat)
                      at fixed x_t; written beta_t (abar_t / alpha_t) / (2 (1 - abar_{t-1})) with
                      abar_t / alpha_t = abar_{t-1} for t >= 1 and = 1 at t = 0, which stays finite
                      at the last step of a zero-terminal-SNR schedule (alpha_T = abar_T = 0).
    An epsilon model has no reverse mean at alpha_t = 0: kappa_t = 0 there (weight 1). At t = 0
    the posterior is a point mass; the variance there is read as sigma_0^2 = beta_0 (DDPM's
    "large" variance at that one step), i.e. abar_{-1} := abar_0 in (1 - abar_{t-1}) only.
    t: (B,) long. Returns (B,) float32, on t's device; computed in float64.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    betas, alphas, abar = (schedule[k].double() for k in ("betas", "alphas", "alphas_cumprod"))
    var_prev = 1 - torch.cat([abar[:1], abar[:-1]])  # 1 - abar_{t-1}, with abar_{-1} := abar_0; (T,)
    if prediction_type == "epsilon":
        coef = betas / (2 * alphas * var_prev)  # inf where alpha_t = 0
    else:
        abar_over_alpha = torch.cat([abar.new_ones(1), abar[:-1]])  # abar_t / alpha_t exactly; (T,)
        coef = betas * abar_over_alpha / (2 * var_prev)
    coef = torch.where(torch.isfinite(coef), coef, torch.zeros_like(coef))  # (T,)
    return coef.float().to(t.device)[t]


def cross_term(pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((target - pred_b) * (pred_theta - pred_b)) per sample, the quantity whose
    2 kappa_t D multiple is log E_q[w] (module docstring, item 2).

    pred (policy), ref_pred (reference = behaviour policy), target: (N, ...) in the network's
    own parametrisation (eps, v or flow velocity), any dtype. Returns (N,) float32, computed in
    float32 without gradient. Equals (r - m + mean((pred - ref_pred)^2)) / 2 in exact arithmetic.
    """
    with torch.no_grad():
        ref = ref_pred.detach().float()
        c = (target.detach().float() - ref) * (pred.detach().float() - ref)
        return c.flatten(1).mean(1)


def rounding_floor(pred: torch.Tensor, ref_pred: torch.Tensor) -> torch.Tensor:
    """Per-sample resolution of :func:`cross_term` when the predictions are rounded to their dtype.

    Rounding to a dtype with machine epsilon u moves each value x by rho with E[rho^2] <=
    (u x)^2 / 12 (uniform rounding error, spacing <= u |x|). rho of the reference enters the
    cross term squared, with a positive mean that no averaging over D removes; the rounding of
    the policy's prediction adds a term of the same order. The floor is twice that bound,
    u^2 mean(ref_pred^2) / 6 (u of the coarser of the two dtypes). bf16 (u = 2^-7), unit-variance
    predictions: 1.0e-5 per value (25 nats at CogVideoX's t = 0, 0.24 at t = 100); float32:
    2.4e-15. (N,) float32, no gradient.
    """
    with torch.no_grad():
        u = max(torch.finfo(pred.dtype).eps, torch.finfo(ref_pred.dtype).eps)
        return (u ** 2 / 6) * ref_pred.detach().float().pow(2).flatten(1).mean(1)


def pair_log_weight(cross_w: torch.Tensor, cross_l: torch.Tensor, kappa: torch.Tensor, num_values: int,
                    *, floor: torch.Tensor | float = 0.0, temperature: float = 1.0) -> torch.Tensor:
    """log of a pair's weight w_w * w_l, the one weight of DPO-C&M and SDPO (this project's
    reading of the [SDPO] abstract; module docstring, items 2-5):

        log w = temperature * 2 kappa_t D (c_w + c_l),   0 where |c_w + c_l| <= floor,
                capped once to +-LOG_WEIGHT_CAP after the sum.

    cross_w, cross_l: (B,) :func:`cross_term` of winner and loser (policy vs reference on the
    same x_t); kappa: (B,) the noise process's coefficient at each pair's t
    (``noise.Process.importance_kappa``: DDPM eps, DDPM v or flow velocity); num_values: D, the
    values per sample (C*H*W or C*F*H*W); floor: (B,) or scalar, the pair's rounding floor
    (sum of :func:`rounding_floor` of its two images; 0 = none); temperature >= 0: 1 is the
    ratio's own scale. Sign: w > 1 where the policy moved towards the target relative to the
    reference (c > 0), w < 1 where it moved away; policy == reference gives exactly w = 1.
    Returns (B,) float32, detached (weights never carry gradient).
    """
    if num_values < 1:
        raise ValueError(f"num_values must be >= 1, got {num_values}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    c_w, c_l = _check_pairs(cross_w.detach(), cross_l.detach())
    with torch.no_grad():
        c = c_w + c_l  # (B,)
        floor = torch.as_tensor(floor, dtype=torch.float32, device=c.device)
        c = torch.where(c.abs() <= floor, torch.zeros_like(c), c)  # below resolution: weight 1
        log_w = temperature * 2.0 * kappa.detach().float().to(c.device) * num_values * c
        return log_w.clamp(-LOG_WEIGHT_CAP, LOG_WEIGHT_CAP)


def clipped_weights(log_weight: torch.Tensor, tau: float, eps_clip: float):
    """w = exp(log_weight), keep = w >= tau, w clipped into [1 - eps_clip, 1 + eps_clip], and
    which kept weights the clip changed. All (B,), no gradient. The clamp is idempotent on
    :func:`pair_log_weight`'s capped output and keeps exp() finite for any other caller."""
    with torch.no_grad():
        w = log_weight.detach().float().clamp(-LOG_WEIGHT_CAP, LOG_WEIGHT_CAP).exp()  # (B,)
        keep = w >= tau
        clipped = w.clamp(1.0 - eps_clip, 1.0 + eps_clip)  # eps_clip = inf: no clipping
        was_clipped = keep & (clipped != w)
        return w, keep, clipped, was_clipped


def kept_weight_sum(log_weight: torch.Tensor, tau: float, eps_clip: float) -> torch.Tensor:
    """(sum of the kept clipped weights, number of kept pairs) of one micro-batch, (2,) float64,
    no gradient: what SDPO's normaliser sums over an update's micro-batches and processes."""
    _, keep, clipped, _ = clipped_weights(log_weight, tau, eps_clip)
    return torch.stack([(clipped * keep).double().sum(), keep.double().sum()])


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

    dpo_loss is Diffusion-DPO (SSPO eq. 5, ``sspo.dpo_loss``: inside = -beta/2 ((m_w - m_l) -
    (r_w - r_l)), loss = -log sigmoid(inside)). Pairs whose weight is below ``tau`` are masked:
    zero loss and zero gradient. Kept weights are clipped into a band around 1, as PPO clips its
    ratio. No gradient flows into w. Identities: log_weight = 0 (all weights 1) gives
    Diffusion-DPO; tau = 0 with eps_clip = inf gives plain importance weighting w * dpo_loss.

    Args: four per-sample errors (B,) as in ``sspo.dpo_loss``; log_weight (B,); beta as there;
    tau >= 0; eps_clip >= 0 (defaults: config.METHODS and the presets).
    Returns per-sample losses (B,) (zero where masked) and metrics incl. "mask_rate" (fraction
    of pairs masked), "clip_rate" (fraction of kept pairs whose weight the clip changed) and
    "mean_weight" (mean unclipped w).
    """
    base, metrics = dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    w, keep, clipped, was_clipped = clipped_weights(log_weight, tau, eps_clip)
    loss = torch.where(keep, clipped * base, torch.zeros_like(base))  # masked: no loss, no grad
    metrics.update(_weight_metrics(w, keep, was_clipped))
    return loss, metrics


def sdpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
              ref_err_l: torch.Tensor, log_weight: torch.Tensor, beta: float = 5000.0, *,
              tau: float, eps_clip: float, norm: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict]:
    """SDPO, this project's reading of [SDPO]: self-normalised importance-weighted Diffusion-DPO.

        w~   = clip(w, 1 - eps_clip, 1 + eps_clip) on pairs with w >= tau (others masked)
        loss = w~ / norm * dpo_loss,   norm = mean of w~ over the kept pairs of the update

    dpo_loss and its beta convention as in :func:`dpo_cm_loss`. ``norm``: the mean kept clipped
    weight over every micro-batch and process of one optimizer update (loop.update passes it,
    from :func:`kept_weight_sum` summed in a gradient-free first pass); None normalises over
    this batch alone (one batch = one update). With B = 1 per micro-batch the batch-local mean
    would make every kept weight 1; the update-wide one does not. Identities: all weights 1
    gives Diffusion-DPO; tau = 0 and eps_clip = inf gives plain self-normalised importance
    weighting. Masked pairs: zero loss, zero gradient; no gradient flows into the weights or
    the normaliser. A caller's ``.mean()`` over all pairs then scales the loss by the kept
    fraction, as masking in DPO-C&M does.
    Args and returns as :func:`dpo_cm_loss`, plus ``norm`` (a positive scalar or 0-d tensor).
    """
    base, metrics = dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    w, keep, clipped, was_clipped = clipped_weights(log_weight, tau, eps_clip)
    with torch.no_grad():
        if norm is None:
            s, n = kept_weight_sum(log_weight, tau, eps_clip)
            norm = s / n.clamp_min(1.0)
        norm = torch.as_tensor(norm, dtype=torch.float32, device=base.device).detach()
        weight = clipped / norm.clamp_min(torch.finfo(torch.float32).tiny)
    loss = torch.where(keep, weight * base, torch.zeros_like(base))
    metrics.update(_weight_metrics(w, keep, was_clipped))
    return loss, metrics
