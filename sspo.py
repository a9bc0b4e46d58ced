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
        proof design"; the importance weight in importance.py is this project's reading, not
        the authors' method or code.

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
b              the behaviour policy, which generated the training pair (importance.py)
m_w, m_l       the policy's per-sample error  mean((pred - target)^2), shape (B,)
r_w, r_l       the reference's per-sample error, shape (B,)
s              SSR sign of eq. 9: +1 where m_w - r_w > 0 (policy worse than the reference on
               the winner: "SFT mode"), -1 otherwise ("DPO mode"); never differentiated
beta           KL-regularisation strength (see "beta convention")
D              values per sample that a per-sample error averages over (C*H*W or C*F*H*W)
lambda_t       beta_t / (2 alpha_t (1 - abar_{t-1})): KL between two DDPM reverse steps per unit
               of squared eps-prediction gap (summed over D)
w, tau,        pair importance weight; DPO-C&M/SDPO mask threshold and clip half-width
eps_clip       (the weight, its derivation and the two losses that use it: importance.py)

Beta convention
---------------
Errors are *means* over every non-batch dimension, and ``beta`` enters as

    inside = -beta / 2 * ((m_w - m_l) - (r_w - r_l)),     loss = -log sigmoid(inside).

``beta`` absorbs the paper's T * omega(lambda_t) factor and the per-dimension mean. The default
5000 is the value of the Diffusion-DPO release; code that writes ``-beta * (...)`` without the
1/2 (e.g. diffusers' training example) needs beta = 2500 for the same loss. Because the error
is a per-dimension mean, the right beta depends on how many values are averaged (64 pixels for
the digits model, 16,384 latent values for SD-1.5 at 512 px): choose it per model family.

Every loss returns ``(per_sample_losses, metrics)``: per-sample losses of shape (B,) (the
caller reduces, e.g. ``.mean()``) and a dict of detached 0-d float32 tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Noise schedule and the forward process q(x_t | x0)
# ---------------------------------------------------------------------------------------------


def _rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Zero terminal SNR, Algorithm 1 of Lin et al., "Common Diffusion Noise Schedules and Sample
    Steps are Flawed" (WACV 2024): move sqrt(abar) down so that its last entry is exactly 0, then
    stretch it so that its first entry is unchanged. (T,) -> (T,), same dtype."""
    root = alphas_cumprod.sqrt()  # sqrt(abar_t)
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))  # root[-1] = 0, root[0] unchanged
    return root ** 2


def make_schedule(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012, beta_schedule: str = "scaled_linear", *,
                  rescale_betas_zero_snr: bool = False,
                  snr_shift_scale: float | None = None) -> dict:
    """DDPM noise schedule, float32, identical to diffusers' ``DDPMScheduler`` (or, with
    ``snr_shift_scale``, to ``CogVideoXDDIMScheduler``).

    ``"scaled_linear"`` (SD-1.5): betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2.
    ``"linear"`` (original DDPM): betas = linspace(beta_start, beta_end, T).

    Options (keyword only; both off gives SD-1.5's schedule, bit for bit):

    rescale_betas_zero_snr: zero terminal SNR (Lin et al. 2024, Algorithm 1): sqrt(abar) is
        shifted and rescaled so that abar_{T-1} = 0 exactly while abar_0 is kept. The last step
        is then pure noise, x_{T-1} = eps. Alone, this equals ``DDPMScheduler(...,
        rescale_betas_zero_snr=True)`` bit for bit (float32 throughout, betas re-derived from the
        rescaled abar as diffusers does): betas[-1] = 1, alphas[-1] = 0. Pair it with
        ``v_prediction``: an epsilon model cannot give x0 at abar = 0 (see :func:`training_target`).
    snr_shift_scale: the SNR shift of CogVideoX's scheduler (CogVideoX: Yang et al. 2024, arXiv
        2408.06072; diffusers' ``CogVideoXDDIMScheduler``): abar <- abar / (s + (1 - s) abar),
        which divides the signal-to-noise ratio abar / (1 - abar) by s at every step (s = 3.0
        for CogVideoX, i.e. noisier at every t); applied *before* the zero-SNR rescale, which
        CogVideoX then applies to abar directly. Given this option, the whole recipe follows
        ``CogVideoXDDIMScheduler``: scaled_linear betas in float64, shift and rescale in
        float64, then abar is cast to float32, so ``alphas_cumprod`` equals
        ``CogVideoXDDIMScheduler(...).alphas_cumprod.float()`` and :func:`q_sample` equals its
        ``add_noise`` on float32 tensors. CogVideoX's published config is ``scaled_linear,
        0.00085, 0.012, rescale_betas_zero_snr=True, snr_shift_scale=3.0, v_prediction``.

    Returns ``{"betas": (T,), "alphas": (T,), "alphas_cumprod": (T,)}``, all float32, with
    alphas = 1 - betas and alphas_cumprod[t] = prod_{s<=t} alphas[s] (abar_t). With
    ``snr_shift_scale``, betas and alphas are re-derived from the shifted abar (alphas_t =
    abar_t / abar_{t-1}, alphas_0 = abar_0), so the three entries stay one schedule;
    ``CogVideoXDDIMScheduler.betas`` keeps the unshifted betas instead, which its DDIM step never
    reads. With zero terminal SNR, alphas[-1] = abar[-1] = 0: any formula dividing by alpha_t,
    abar_t or sqrt(abar_t) must be checked at t = T - 1.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if rescale_betas_zero_snr and num_train_timesteps < 2:
        raise ValueError("rescale_betas_zero_snr needs num_train_timesteps >= 2")
    if snr_shift_scale is not None and not snr_shift_scale > 0:
        raise ValueError(f"snr_shift_scale must be > 0, got {snr_shift_scale}")
    # CogVideoX builds its scaled_linear betas in float64; SD-1.5 (DDPMScheduler) in float32.
    dtype = torch.float64 if snr_shift_scale is not None else torch.float32
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=dtype) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}")

    if snr_shift_scale is None:
        if rescale_betas_zero_snr:  # DDPMScheduler: rescale abar, then re-derive the betas
            abar = _rescale_zero_terminal_snr(torch.cumprod(1.0 - betas, dim=0))
            betas = 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])  # alphas_t = abar_t / abar_{t-1}
        alphas = 1.0 - betas
        return {"betas": betas, "alphas": alphas, "alphas_cumprod": torch.cumprod(alphas, dim=0)}

    s = snr_shift_scale
    abar = torch.cumprod(1.0 - betas, dim=0)
    abar = abar / (s + (1 - s) * abar)  # SNR / s
    if rescale_betas_zero_snr:
        abar = _rescale_zero_terminal_snr(abar)
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])  # abar[:-1] > 0: only abar[-1] can be 0
    betas = (1.0 - alphas).float()
    return {"betas": betas, "alphas": 1.0 - betas, "alphas_cumprod": abar.float()}


def _per_sample(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """coef[t] as shape (B, 1, ..., 1) broadcastable against ``like``, in ``like``'s dtype."""
    c = coef.to(device=like.device, dtype=like.dtype)[t.to(like.device)]  # (B,)
    return c.reshape(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B,1,...,1)


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x0):  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (DDPM eq. 4).

    x0, eps: (B, ...) any number of trailing dims; t: (B,) long; alphas_cumprod: (T,).
    Arithmetic follows ``DDPMScheduler.add_noise`` (schedule cast to x0's dtype first).
    No division: at a zero-terminal-SNR step (abar = 0) x_t = eps exactly.
    """
    abar = _per_sample(alphas_cumprod, t, x0)
    return abar ** 0.5 * x0 + (1 - abar) ** 0.5 * eps


def training_target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                    alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """What the network regresses: ``eps`` for "epsilon", v = sqrt(abar_t) eps - sqrt(1-abar_t) x0
    for "v_prediction" (Salimans & Ho 2022; ``DDPMScheduler.get_velocity``). Shapes as ``x0``.

    No division, so both are finite at every t. At a zero-terminal-SNR step (abar_t = 0,
    :func:`make_schedule` with ``rescale_betas_zero_snr``) v = -x0: the v model must predict the
    clean sample from pure noise, which is the point of zero SNR (Lin et al. 2024, Sec. 3.2).
    The epsilon target there is eps = x_t, which the network can copy from its input, and
    x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) cannot be formed: use v_prediction with
    zero terminal SNR (CogVideoX does).
    """
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        abar = _per_sample(alphas_cumprod, t, x0)
        return abar ** 0.5 * eps - (1 - abar) ** 0.5 * x0
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def eps_from_v(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
               alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The epsilon a v-prediction implies:  eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t.

    From x_t = sqrt(abar) x0 + sqrt(1-abar) eps and v = sqrt(abar) eps - sqrt(1-abar) x0
    (a rotation of (x0, eps) by the angle whose cosine is sqrt(abar)). No division, so it is
    finite at abar_t = 0, where it gives eps = x_t; the matching x0 = sqrt(abar) x_t -
    sqrt(1-abar) v gives x0 = -v there. At fixed x_t, eps - eps_hat = sqrt(abar_t) (v - v_hat).
    v, x_t: (B, ...); t: (B,) long; alphas_cumprod: (T,). Returns a tensor shaped like v.
    """
    abar = _per_sample(alphas_cumprod, t, v)
    return abar ** 0.5 * v + (1 - abar) ** 0.5 * x_t


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
