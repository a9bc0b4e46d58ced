"""The math of SSPO and its neighbours, as pure functions of tensors.

Nothing here knows about models, files or configs: every function takes tensors and returns
tensors, so each equation can be unit-tested on its own and read beside the paper.

Papers
------
[SSPO]  Bridging SFT and DPO for Diffusion Model Alignment with Self-Sampling Preference
        Optimization, arXiv 2410.05255 v2. Eq. 2 (diffusion / SFT loss), eq. 5 (Diffusion-DPO
        against samples from the experience replay distribution), eq. 8-9 (Self-Sampling
        Regularization), Appendix B.5 (the authors' pseudocode of the loss: ground truth for
        the sign convention), Table 6 (ablations).
[DDPO]  Diffusion-DPO: Wallace et al., Diffusion Model Alignment Using Direct Preference
        Optimization, CVPR 2024 (the loss restated as SSPO eq. 5).
[SDPO]  SDPO: Importance-Sampled Direct Preference Optimization for Stable Diffusion Training,
        arXiv 2505.21893. Only its abstract is available to this project, and its v2
        (2025-09-25) carries the authors' notice of "a critical error in the main theorem and
        proof design"; the importance weight below ("Importance weights") is this project's
        reading, not the authors' method or code.

Glossary of symbols
-------------------
T              number of training timesteps (1000 for SD-1.5)
t              integer timestep in [0, T), one per pair, shared by winner and loser, shape (B,)
beta_t         noise schedule variance at step t ("betas")
alpha_t        1 - beta_t ("alphas")
abar_t         prod_{s<=t} alpha_s ("alphas_cumprod", \\bar{alpha}_t)
x0             clean sample (pixels for the digits model, VAE latents for SD-1.5), (B,C,H,W)
               or, for video, (B,C,F,H,W)
eps            standard Gaussian noise, same shape as x0
x_t            sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps                       (q(x_t | x0))
v              sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0     (the "v_prediction" target)
_w, _l         the preferred ("winning") and the dispreferred ("losing") sample of a pair; in
               SSPO the loser is sampled from a replayed checkpoint
model_, ref_   the policy being trained and the (frozen or replayed) reference network
b              the behaviour policy, which generated the training pair (see "Importance weights")
m_w, m_l       the policy's per-sample error  mean((pred - target)^2), shape (B,)
r_w, r_l       the reference's per-sample error, shape (B,)
s              SSR sign of eq. 9: +1 where m_w - r_w > 0 (policy worse than the reference on
               the winner: "SFT mode"), -1 otherwise ("DPO mode"); never differentiated
beta           KL-regularisation strength (see "beta convention")
D              values per sample that a per-sample error averages over (C*H*W or C*F*H*W)
lambda_t       beta_t / (2 alpha_t (1 - abar_{t-1})): KL between two DDPM reverse steps per unit
               of squared eps-prediction gap (summed over D)
w, tau,        pair importance weight; DPO-C&M/SDPO mask threshold and clip half-width
eps_clip

Beta convention
---------------
Errors are *means* over every non-batch dimension, and ``beta`` enters as

    inside = -beta / 2 * ((m_w - m_l) - (r_w - r_l)),     loss = -log sigmoid(inside).

``beta`` absorbs the paper's T * omega(lambda_t) factor and the per-dimension mean. The default
5000 is the value of the Diffusion-DPO release; code that writes ``-beta * (...)`` without the
1/2 (e.g. diffusers' training example) needs beta = 2500 for the same loss. Because the error
is a per-dimension mean, the right beta depends on how many values are averaged (64 pixels for
the digits model, 16,384 latent values for SD-1.5 at 512 px): choose it per model family.

Importance weights (DPO-C&M, SDPO): this project's reading
----------------------------------------------------------
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
   uses. Flow matching is not covered yet.
6. Where w is low: where the policy denoises the pair worse than b (m - r > 0 over the pair:
   the policy has moved away from the data's generator), amplified where lambda_t is large:
   near the data the reverse step's noise sigma_t is tiny, so the same prediction gap separates
   the two transition densities far more. For SD-1.5's schedule lambda_t ~ 1/(2t) there (0.5 at
   t = 0, 1; 0.05 at t = 10) and 0.003-0.007 for t >= 100. At large t (the early, noisy reverse
   steps) lambda_t is small and both networks predict eps almost exactly, so w stays near 1.
   This reading places low (and high) weights at the *late* reverse steps, small t, not at the
   early ones where the [SDPO] abstract reports low weights; it does not reproduce that
   statement. Measured (weights_report.py): after short Diffusion-DPO fine-tunes w < 1 for
   most pairs (DPO raised the policy's error on both images) and falls well below 1 only for
   t < ~100 (digits) or ~200 (SD-1.5's latent shape).
7. Use: DPO-C&M masks pairs with w < tau (zero loss and gradient: too far off-policy) and clips
   the kept weights into [1 - eps_clip, 1 + eps_clip], as PPO clips its ratio; SDPO weights each
   kept pair's DPO loss by its clipped weight, self-normalised to mean 1 over the kept pairs.
   Weights never carry gradient.

Every loss returns ``(per_sample_losses, metrics)``: per-sample losses of shape (B,) (the
caller reduces, e.g. ``.mean()``) and a dict of detached 0-d float32 tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Noise schedule and the forward process q(x_t | x0)
# ---------------------------------------------------------------------------------------------


def make_schedule(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012, beta_schedule: str = "scaled_linear") -> dict:
    """DDPM noise schedule, float32, identical to diffusers' ``DDPMScheduler``.

    ``"scaled_linear"`` (SD-1.5): betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2.
    ``"linear"`` (original DDPM): betas = linspace(beta_start, beta_end, T).

    Returns ``{"betas": (T,), "alphas": (T,), "alphas_cumprod": (T,)}``, all float32, with
    alphas = 1 - betas and alphas_cumprod[t] = prod_{s<=t} alphas[s] (abar_t).
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                               dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}")
    alphas = 1.0 - betas
    return {"betas": betas, "alphas": alphas, "alphas_cumprod": torch.cumprod(alphas, dim=0)}


def _per_sample(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """coef[t] as shape (B, 1, ..., 1) broadcastable against ``like``, in ``like``'s dtype."""
    c = coef.to(device=like.device, dtype=like.dtype)[t.to(like.device)]  # (B,)
    return c.reshape(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B,1,...,1)


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x0):  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (DDPM eq. 4).

    x0, eps: (B, ...) any number of trailing dims; t: (B,) long; alphas_cumprod: (T,).
    Arithmetic follows ``DDPMScheduler.add_noise`` (schedule cast to x0's dtype first).
    """
    abar = _per_sample(alphas_cumprod, t, x0)
    return abar ** 0.5 * x0 + (1 - abar) ** 0.5 * eps


def training_target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                    alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """What the network regresses: ``eps`` for "epsilon", v = sqrt(abar_t) eps - sqrt(1-abar_t) x0
    for "v_prediction" (Salimans & Ho 2022; ``DDPMScheduler.get_velocity``). Shapes as ``x0``."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        abar = _per_sample(alphas_cumprod, t, x0)
        return abar ** 0.5 * eps - (1 - abar) ** 0.5 * x0
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dim, in float32.

    pred, target: (B,C,H,W) images or (B,C,F,H,W) videos (any trailing dims). Returns (B,).
    For an epsilon target this is ``||eps - eps_theta(x_t, t)||^2`` of [SSPO] eq. 2 divided by
    the number of values (for a v target, the same for v).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)  # (B, ...) -> (B,)


# ---------------------------------------------------------------------------------------------
# Losses. m_* are the policy's per-sample errors, r_* the reference's; all (B,) float.
# ---------------------------------------------------------------------------------------------


def _check_pairs(*errs: torch.Tensor) -> list[torch.Tensor]:
    shape = errs[0].shape
    if len(shape) != 1:
        raise ValueError(f"per-sample errors must have shape (B,), got {tuple(shape)}")
    for e in errs:
        if e.shape != shape:
            raise ValueError(f"per-sample errors differ in shape: {tuple(shape)} vs {tuple(e.shape)}")
    return [e.float() for e in errs]


def _preference_metrics(inside: torch.Tensor, model_err_w: torch.Tensor, model_err_l: torch.Tensor,
                        ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, beta: float) -> dict:
    """Implicit accuracy and implicit rewards, as in the Diffusion-DPO release.

    reward_w = -beta/2 (m_w - r_w), reward_l = -beta/2 (m_l - r_l); "reward_margin" is the
    mean ``inside``: reward_w - reward_l for DPO and for SSPO pairs in DPO mode, but
    reward_w + reward_l for SSPO pairs in SFT mode (s = +1). Implicit accuracy = fraction inside > 0.
    """
    with torch.no_grad():
        return {
            "implicit_acc": (inside > 0).float().mean(),
            "reward_margin": inside.mean(),
            "reward_w": (-0.5 * beta * (model_err_w - ref_err_w)).mean(),
            "reward_l": (-0.5 * beta * (model_err_l - ref_err_l)).mean(),
            "model_err_w": model_err_w.mean(),
            "model_err_l": model_err_l.mean(),
        }


def sft_loss(model_err_w: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Supervised fine-tuning on the winners: the denoising loss of [SSPO] eq. 2.

    model_err_w: (B,) per-sample mean squared error of the policy on the winning samples.
    Returns (model_err_w as float32 (B,), {"model_err_w": mean}). No beta, no reference.
    """
    (m_w,) = _check_pairs(model_err_w)
    return m_w, {"model_err_w": m_w.detach().mean()}


def dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
             ref_err_l: torch.Tensor, beta: float = 5000.0) -> tuple[torch.Tensor, dict]:
    """Diffusion-DPO ([DDPO] eq. 14; restated as [SSPO] eq. 5).

        inside = -beta/2 * ((m_w - m_l) - (r_w - r_l)),   loss = -log sigmoid(inside)

    Args: the four per-sample errors, each (B,) (policy m_*, reference r_*; _w winner, _l
    loser, sharing t and eps within a pair). beta: see the module docstring (5000 with the 1/2
    equals 2500 without it). Lower loss <=> the policy improves on the winner more than on the
    loser, relative to the reference. Policy == reference gives inside = 0, loss = log 2.
    Returns per-sample losses (B,) and metrics (implicit_acc, reward_margin, reward_w/_l, ...).
    """
    m_w, m_l, r_w, r_l = _check_pairs(model_err_w, model_err_l, ref_err_w, ref_err_l)
    inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))  # (B,)
    return -F.logsigmoid(inside), _preference_metrics(inside, m_w, m_l, r_w, r_l, beta)


SSR_MODES = ("sign", "indicator", "none")


def ssr_sign(model_err_w: torch.Tensor, ref_err_w: torch.Tensor) -> torch.Tensor:
    """Self-Sampling Regularization switch of [SSPO] eq. 9 (Appendix B.5: ``pos_losses_w > 0``).

    s = +1 where m_w - r_w > 0 (the policy denoises the winner *worse* than the replayed
    checkpoint, so the replayed sample is likely not a true loser: SFT mode), else -1 (DPO
    mode). (B,) float32, computed without gradient.
    """
    with torch.no_grad():
        return torch.where(model_err_w.float() - ref_err_w.float() > 0, 1.0, -1.0)


def sspo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
              ref_err_l: torch.Tensor, beta: float = 5000.0,
              ssr: str = "sign") -> tuple[torch.Tensor, dict]:
    """SSPO: Diffusion-DPO against replayed samples, with Self-Sampling Regularization.

    [SSPO] eq. 8-9 and the pseudocode of Appendix B.5:

        s      = +1 if m_w - r_w > 0 else -1                 (no gradient)
        inside = -beta/2 * ((m_w + s*m_l) - (r_w + s*r_l)),   loss = -log sigmoid(inside)

    s = -1 is exactly Diffusion-DPO; s = +1 makes the loss decrease in both m_w and m_l, i.e.
    SFT on the winner *and* on the replayed sample. Ablations ([SSPO] Table 6):
      ssr="indicator": model_diff = m_w - 1[s=-1] m_l (and likewise for r): in SFT mode the
                       replayed sample is dropped instead of imitated;
      ssr="none":      s = -1 always: plain Diffusion-DPO against replayed samples.

    Args: four per-sample errors, each (B,) — m_l/r_l are errors on the sample generated by the
    replayed checkpoint, which is also the reference network. beta: module docstring.
    Returns per-sample losses (B,) and metrics incl. "ssr_rate" = fraction of pairs with s = +1
    ([SSPO] Fig. 4; 0 for ssr="none").
    """
    if ssr not in SSR_MODES:
        raise ValueError(f"ssr must be one of {SSR_MODES}, got {ssr!r}")
    m_w, m_l, r_w, r_l = _check_pairs(model_err_w, model_err_l, ref_err_w, ref_err_l)
    s = ssr_sign(m_w, r_w) if ssr != "none" else torch.full_like(m_w, -1.0)  # (B,)
    if ssr == "indicator":
        keep_l = (s < 0).float()  # 1[s=-1]: the loser counts only in DPO mode
        model_diff, ref_diff = m_w - keep_l * m_l, r_w - keep_l * r_l
    else:
        model_diff, ref_diff = m_w + s * m_l, r_w + s * r_l
    inside = -0.5 * beta * (model_diff - ref_diff)  # (B,)
    metrics = _preference_metrics(inside, m_w, m_l, r_w, r_l, beta)
    metrics["ssr_rate"] = (s > 0).float().mean()
    return -F.logsigmoid(inside), metrics


# ---------------------------------------------------------------------------------------------
# Importance-sampled DPO (DPO-C&M, SDPO). This project's reading of [SDPO]; the derivation is in
# the module docstring, "Importance weights".
# ---------------------------------------------------------------------------------------------

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
    :func:`dpo_loss`; tau >= 0; eps_clip >= 0 (defaults: config.py's).
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
    Args and returns as :func:`dpo_cm_loss` (defaults: config.py's sdpo preset).
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
