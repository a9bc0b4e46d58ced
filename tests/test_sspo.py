"""Identities of the loss math (sspo.py) against diffusers, closed forms and the paper's pseudocode."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

import importance
import sspo

torch.manual_seed(0)


def _errs(B=64, seed=0, dtype=torch.float32):
    """m_w, m_l, r_w, r_l: errors around 0.1 whose policy/reference gaps (~1e-4) keep
    beta/2 * gap of order 1, so the sigmoid is not saturated and gradients are visible."""
    g = torch.Generator().manual_seed(seed)
    base_w, base_l = torch.rand(2, B, generator=g) * 0.1 + 0.05
    m_w, m_l, r_w, r_l = (b + 2e-4 * torch.randn(B, generator=g) for b in (base_w, base_l, base_w, base_l))
    return [x.to(dtype) for x in (m_w, m_l, r_w, r_l)]


# --------------------------------------------------------------------------- schedule vs diffusers

@pytest.mark.parametrize("kind", ["scaled_linear", "linear"])
def test_schedule_equals_diffusers(kind):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=kind)
    ours = sspo.make_schedule(1000, 0.00085, 0.012, kind)
    for k in ("betas", "alphas", "alphas_cumprod"):
        assert ours[k].dtype == torch.float32
        assert torch.equal(ours[k], getattr(ref, k)), k


def test_schedule_rejects_unknown():
    with pytest.raises(ValueError, match="beta_schedule"):
        sspo.make_schedule(beta_schedule="cosine-ish")


@pytest.mark.parametrize("shape", [(5, 4, 8, 8), (3, 4, 6, 8, 8)])
def test_q_sample_and_velocity_equal_diffusers(shape):
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    abar = sspo.make_schedule()["alphas_cumprod"]
    x0, eps = torch.randn(shape), torch.randn(shape)
    t = torch.randint(0, 1000, (shape[0],))
    assert torch.equal(sspo.q_sample(x0, t, eps, abar), sched.add_noise(x0, eps, t))
    assert torch.equal(sspo.training_target(x0, eps, t, abar, "v_prediction"), sched.get_velocity(x0, eps, t))
    assert torch.equal(sspo.training_target(x0, eps, t, abar, "epsilon"), eps)
    with pytest.raises(ValueError, match="prediction_type"):
        sspo.training_target(x0, eps, t, abar, "sample")


def test_per_sample_error_images_videos_low_precision():
    for shape in [(3, 4, 8, 8), (2, 4, 5, 8, 8)]:
        p, q = torch.randn(shape), torch.randn(shape)
        e = sspo.per_sample_error(p, q)
        assert e.shape == (shape[0],) and e.dtype == torch.float32
        assert torch.allclose(e, torch.stack([F.mse_loss(p[i], q[i]) for i in range(shape[0])]))
        for dt in (torch.float16, torch.bfloat16):
            e_lo = sspo.per_sample_error(p.to(dt), q.to(dt))
            assert e_lo.dtype == torch.float32
            assert torch.allclose(e_lo, sspo.per_sample_error(p.to(dt).float(), q.to(dt).float()))
    with pytest.raises(ValueError, match="shape"):
        sspo.per_sample_error(torch.zeros(2, 3), torch.zeros(2, 4))


# --------------------------------------------------------------------------- DPO closed forms

def test_dpo_policy_equals_reference_gives_log2_and_zero_accuracy():
    m_w, m_l, _, _ = _errs()
    loss, met = sspo.dpo_loss(m_w, m_l, m_w.clone(), m_l.clone())
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)))
    assert met["implicit_acc"].item() == 0.0 and met["reward_margin"].item() == 0.0


def test_dpo_matches_hand_formula_and_beta_convention():
    m_w, m_l, r_w, r_l = _errs(seed=1)
    loss, _ = sspo.dpo_loss(m_w, m_l, r_w, r_l, beta=5000.0)
    # the "2500 without the 1/2" convention of diffusers' example gives the same number
    inside = -2500.0 * ((m_w - m_l) - (r_w - r_l))
    assert torch.allclose(loss, -F.logsigmoid(inside))


def test_dpo_gradient_lowers_winner_raises_loser():
    m_w, m_l, r_w, r_l = _errs(seed=2)
    m_w.requires_grad_(True), m_l.requires_grad_(True)
    sspo.dpo_loss(m_w, m_l, r_w, r_l)[0].sum().backward()
    assert (m_w.grad > 0).all()  # descent lowers the winner's error
    assert (m_l.grad < 0).all()  # descent raises the loser's error


# --------------------------------------------------------------------------- SSPO

def paper_pseudocode_loss(model_losses_w, model_losses_l, ref_losses_w, ref_losses_l, beta_dpo):
    """[SSPO] Appendix B.5, re-typed line by line (per-sample losses instead of the mean)."""
    pos_losses_w = model_losses_w - ref_losses_w
    sign = torch.where(pos_losses_w > 0, torch.tensor(1.0), torch.tensor(-1.0))
    model_diff = model_losses_w + sign * model_losses_l
    ref_diff = ref_losses_w + sign * ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    return -1 * F.logsigmoid(inside_term), implicit_acc


@pytest.mark.parametrize("seed", range(5))
def test_sspo_matches_appendix_b5_pseudocode(seed):
    g = torch.Generator().manual_seed(seed)
    target, noise = torch.randn(32, 4, 8, 8, generator=g), torch.randn(32, 4, 8, 8, generator=g)
    ref_pred = target + 0.3 * noise
    # the policy differs from the reference by ~1e-3 per value, in both directions, so pairs
    # fall in both SSR modes and beta/2 * gap stays O(1) (no saturated sigmoid)
    model_pred = ref_pred + 3e-3 * torch.randn(32, 4, 8, 8, generator=g)
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    mw, ml = model_losses.chunk(2)
    rw, rl = ref_losses.chunk(2)
    want, want_acc = paper_pseudocode_loss(mw, ml, rw, rl, 5000.0)
    got, met = sspo.sspo_loss(mw, ml, rw, rl, beta=5000.0, ssr="sign")
    assert 0 < met["ssr_rate"] < 1, "both SFT and DPO mode must be exercised"
    assert ((want > 0.05) & (want < 5)).float().mean() > 0.5, "sigmoid should not be saturated"
    assert torch.allclose(got, want) and met["implicit_acc"] == want_acc
    # and through per_sample_error, as the training loop computes it
    e = sspo.per_sample_error(model_pred, target)
    assert torch.allclose(e, model_losses)


def test_sspo_all_dpo_mode_equals_dpo():
    m_w, m_l, r_w, r_l = _errs(seed=3)
    m_w = r_w - 1e-4  # policy better than the reference on every winner -> s = -1
    a, ma = sspo.sspo_loss(m_w, m_l, r_w, r_l)
    b, _ = sspo.dpo_loss(m_w, m_l, r_w, r_l)
    assert torch.equal(a, b) and ma["ssr_rate"].item() == 0.0


def test_sspo_ssr_none_equals_dpo_everywhere():
    m_w, m_l, r_w, r_l = _errs(seed=4)
    a, ma = sspo.sspo_loss(m_w, m_l, r_w, r_l, ssr="none")
    assert torch.equal(a, sspo.dpo_loss(m_w, m_l, r_w, r_l)[0]) and ma["ssr_rate"].item() == 0.0


def test_sspo_sft_mode_gradient_lowers_both_errors():
    m_w, m_l, r_w, r_l = _errs(seed=5)
    m_w = (r_w + 1e-4).requires_grad_(True)  # policy worse on every winner -> s = +1
    m_l.requires_grad_(True)
    loss, met = sspo.sspo_loss(m_w, m_l, r_w, r_l)
    loss.sum().backward()
    assert met["ssr_rate"].item() == 1.0
    assert (m_w.grad > 0).all() and (m_l.grad > 0).all()


def test_sspo_indicator_drops_replayed_term_in_sft_mode():
    m_w, m_l, r_w, r_l = _errs(seed=6)
    m_w[:32] = r_w[:32] + 1e-4  # SFT mode on the first half
    m_w[32:] = r_w[32:] - 1e-4  # DPO mode on the second half
    m_l.requires_grad_(True)
    loss, met = sspo.sspo_loss(m_w, m_l, r_w, r_l, ssr="indicator")
    assert met["ssr_rate"].item() == 0.5
    # SFT mode: loss depends on the winner only; DPO mode: exactly DPO
    assert torch.allclose(loss[:32], -F.logsigmoid(-2500.0 * (m_w[:32] - r_w[:32])))
    assert torch.allclose(loss[32:], sspo.dpo_loss(m_w, m_l, r_w, r_l)[0][32:])
    loss.sum().backward()
    assert (m_l.grad[:32] == 0).all() and (m_l.grad[32:] < 0).all()


def test_sspo_gradient_is_the_analytic_one_with_the_ssr_sign_held_constant():
    # d(loss)/d(m_w) must equal the analytic derivative with s held constant: fails if s carries a
    # gradient (e.g. a straight-through sign hard + (soft - soft.detach()) computed outside no_grad)
    m_w, m_l, r_w, r_l = _errs(seed=7)
    m_w = m_w.clone().requires_grad_(True)
    loss, _ = sspo.sspo_loss(m_w, m_l, r_w, r_l)
    loss.sum().backward()
    s = torch.where(m_w.detach() - r_w > 0, 1.0, -1.0)
    inside = -2500.0 * ((m_w.detach() + s * m_l) - (r_w + s * r_l))
    assert torch.allclose(m_w.grad, torch.sigmoid(-inside) * 2500.0)


def test_sspo_rejects_unknown_ssr_and_bad_shapes():
    m = _errs()
    with pytest.raises(ValueError, match="ssr"):
        sspo.sspo_loss(*m, ssr="soft")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        sspo.dpo_loss(*(x.view(8, 8) for x in m))


# --------------------------------------------------------------------------- importance-sampled DPO
# The weight itself (estimator, cap, coefficients): tests/test_importance.py. Here: the two
# losses that use it.

@pytest.mark.parametrize("fn", [importance.dpo_cm_loss, importance.sdpo_loss])
def test_unit_weights_give_dpo(fn):
    m = _errs(seed=8)
    loss, met = fn(*m, log_weight=torch.zeros(64), tau=0.5, eps_clip=0.2)
    assert torch.equal(loss, sspo.dpo_loss(*m)[0])
    assert met["mask_rate"] == 0 and met["clip_rate"] == 0 and met["mean_weight"] == 1


def test_dpo_cm_tau0_noclip_is_plain_weighting_and_sdpo_self_normalised():
    m = _errs(seed=9)
    logw = 3 * torch.randn(64)  # weights far from 1 on both sides
    dpo = sspo.dpo_loss(*m)[0]
    a, met = importance.dpo_cm_loss(*m, log_weight=logw, tau=0.0, eps_clip=float("inf"))
    assert torch.allclose(a, logw.exp() * dpo)
    assert met["mask_rate"] == 0 and met["clip_rate"] == 0
    b, _ = importance.sdpo_loss(*m, log_weight=logw, tau=0.0, eps_clip=float("inf"))
    assert torch.allclose(b, logw.exp() / logw.exp().mean() * dpo)


@pytest.mark.parametrize("fn", [importance.dpo_cm_loss, importance.sdpo_loss])
def test_masked_pairs_zero_loss_zero_grad_and_weights_not_differentiated(fn):
    m_w, m_l, r_w, r_l = _errs(seed=10)
    m_w.requires_grad_(True)
    logw = torch.log(torch.linspace(0.05, 2.0, 64)).requires_grad_(True)
    loss, met = fn(m_w, m_l, r_w, r_l, log_weight=logw, tau=0.5, eps_clip=0.2)
    w = logw.detach().exp()
    masked = w < 0.5
    assert masked.any() and (~masked).any()
    assert (loss[masked] == 0).all() and (loss[~masked] > 0).all()
    assert abs(met["mask_rate"].item() - masked.float().mean().item()) < 1e-6
    outside = (~masked) & ((w < 0.8) | (w > 1.2))  # kept pairs the clip changes
    assert abs(met["clip_rate"].item() - (outside.sum() / (~masked).sum()).item()) < 1e-6
    loss.sum().backward()
    assert (m_w.grad[masked] == 0).all() and (m_w.grad[~masked] != 0).all()
    assert logw.grad is None  # no gradient flows into importance weights
    dpo = sspo.dpo_loss(m_w, m_l, r_w, r_l)[0]
    wc = w.clamp(0.8, 1.2)  # kept weights are clipped into [0.8, 1.2]
    if fn is importance.sdpo_loss:
        wc = wc / wc[~masked].mean()
    assert torch.allclose(loss[~masked], (wc * dpo)[~masked])


# --------------------------------------------------------------------------- dtypes and video

@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_losses_accept_low_precision_and_compute_float32(dt):
    m = _errs(seed=11)
    lo = [x.to(dt) for x in m]
    for fn in (sspo.dpo_loss, sspo.sspo_loss):
        l_lo, _ = fn(*lo)
        l_hi, _ = fn(*[x.float() for x in lo])
        assert l_lo.dtype == torch.float32 and torch.equal(l_lo, l_hi)
    l_lo, _ = importance.sdpo_loss(*lo, log_weight=torch.zeros(64, dtype=dt), tau=0.5, eps_clip=0.2)
    assert l_lo.dtype == torch.float32


def test_video_end_to_end_through_losses():
    B = 16
    shape = (2 * B, 4, 5, 8, 8)  # [winners; losers] (2B,C,F,H,W)
    g = torch.Generator().manual_seed(12)
    target = torch.randn(shape, generator=g)
    ref_pred = target + 0.3 * torch.randn(shape, generator=g)
    model_pred = (ref_pred + 3e-3 * torch.randn(shape, generator=g)).requires_grad_(True)
    m_w, m_l = sspo.per_sample_error(model_pred, target).chunk(2)  # (2B,) -> (B,), (B,)
    r_w, r_l = sspo.per_sample_error(ref_pred, target).chunk(2)
    loss, met = sspo.sspo_loss(m_w, m_l, r_w, r_l)
    # by hand: one error per video, the mean over channels, frames and pixels; then B.5
    hand_m = (model_pred.detach() - target).pow(2).mean(dim=(1, 2, 3, 4)).chunk(2)
    hand_r = (ref_pred - target).pow(2).mean(dim=(1, 2, 3, 4)).chunk(2)
    want, _ = paper_pseudocode_loss(hand_m[0], hand_m[1], hand_r[0], hand_r[1], 5000.0)
    assert 0 < met["ssr_rate"] < 1, "both SFT and DPO mode must be exercised"
    assert loss.shape == (B,) and torch.allclose(loss, want)
    loss.mean().backward()
    assert model_pred.grad.shape == shape and (model_pred.grad != 0).any()


@pytest.mark.parametrize("fn", [importance.dpo_cm_loss, importance.sdpo_loss])
def test_zero_terminal_snr_v_prediction_is_finite(fn):
    """abar_T = 0 (diffusers' rescale_betas_zero_snr): at t = T-1 the eps coefficient lambda_t
    is infinite (alpha_T = 0), the v coefficient beta_t abar_{t-1} / (2 (1 - abar_{t-1})) is not."""
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          rescale_betas_zero_snr=True, prediction_type="v_prediction")
    sch = {k: getattr(sched, k) for k in ("betas", "alphas", "alphas_cumprod")}
    assert sch["alphas_cumprod"][-1] == 0 and sch["alphas"][-1] == 0
    g = torch.Generator().manual_seed(13)
    B, t = 4, torch.tensor([999, 999, 998, 0])
    x0 = torch.randn(2 * B, 4, 8, 8, generator=g)  # [winners; losers]
    eps = torch.randn(B, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    t2 = t.repeat(2)
    v = sspo.training_target(x0, eps, t2, sch["alphas_cumprod"], "v_prediction")
    ref_pred = v + 0.3 * torch.randn(v.shape, generator=g)
    model_pred = (ref_pred + 0.05 * torch.randn(v.shape, generator=g)).requires_grad_(True)
    m_w, m_l = sspo.per_sample_error(model_pred, v).chunk(2)  # (2B,) -> (B,), (B,)
    r_w, r_l = sspo.per_sample_error(ref_pred, v).chunk(2)
    c_w, c_l = importance.cross_term(model_pred, ref_pred, v).chunk(2)
    kappa = importance.importance_coef(t, sch, "v_prediction")
    log_w = importance.pair_log_weight(c_w, c_l, kappa, num_values=256)
    assert torch.isfinite(log_w).all() and (log_w[:2] != 0).all()  # finite, and not switched off
    loss, met = fn(m_w, m_l, r_w, r_l, log_w, beta=5000.0, tau=0.5, eps_clip=0.2)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(model_pred.grad).all()
    assert all(torch.isfinite(x) for x in met.values())
    # the eps coefficient at alpha_T = 0 is set to 0 (weight 1), not inf/nan
    coef = importance.importance_coef(torch.tensor([999, 0]), sch, "epsilon")
    assert coef[0] == 0 and torch.isfinite(coef).all()


def _drifted_batch(B, small_t_gap, floor_gap, seed=14):
    """A fixed batch of per-sample errors (B,) x4 and t (B,), stratified over [0, 1000) as in
    training. The policy's excess error m - r follows the t-profile measured by
    research/pair_weights.py after a short Diffusion-DPO fine-tune (results/pair_weights.md): large
    near the data, ``small_t_gap * exp(-t/100)``, plus ``floor_gap`` everywhere, +-50%."""
    g = torch.Generator().manual_seed(seed)
    t = ((torch.arange(B) + torch.rand(B, generator=g)) * 1000 / B).long()  # (B,)
    r_w, r_l = (0.05 + 0.5 * torch.exp(-t / 300) * (1 + 0.2 * torch.rand(B, generator=g)) for _ in range(2))
    gap = lambda: (small_t_gap * torch.exp(-t / 100) + floor_gap) * (1 + 0.5 * torch.randn(B, generator=g))
    return r_w + gap(), r_l + gap(), r_w, r_l, t


@pytest.mark.parametrize("D, beta, small_t_gap, floor_gap", [
    (64, 500.0, 0.2, 2e-3),           # digits: 1x8x8, the digits preset's beta
    (4 * 64 * 64, 5000.0, 2e-3, 5e-4),  # SD-1.5's latent shape and beta
])
@pytest.mark.parametrize("method", ["dpo_cm", "sdpo"])
def test_weights_change_the_gradient_at_default_settings(method, D, beta, small_t_gap, floor_gap):
    """At the config defaults, masking and clipping act on this batch, and the gradient differs
    from Diffusion-DPO's far beyond float noise (before: weights >= 0.9 made them equal)."""
    import config
    cfg = config.resolve({"method": method})
    m_w, m_l, r_w, r_l, t = _drifted_batch(128, small_t_gap, floor_gap)
    # no drift term here (errors only): c = (r - m) / 2 per image, so log w = -lambda_t D (m - r) summed
    kappa = importance.importance_coef(t, sspo.make_schedule())
    log_w = importance.pair_log_weight((r_w - m_w) / 2, (r_l - m_l) / 2, kappa, num_values=D)
    grads = []
    for fn in (sspo.dpo_loss, getattr(importance, f"{method}_loss")):
        mw, ml = m_w.clone().requires_grad_(True), m_l.clone().requires_grad_(True)
        kw = {} if fn is sspo.dpo_loss else dict(log_weight=log_w, tau=cfg.tau, eps_clip=cfg.eps_clip)
        loss, met = fn(mw, ml, r_w, r_l, beta=beta, **kw)
        loss.mean().backward()
        grads.append(torch.cat([mw.grad, ml.grad]))
    assert met["mask_rate"] > 0 and met["clip_rate"] > 0
    rel = (grads[1] - grads[0]).norm() / grads[0].norm()
    assert rel > 0.01, rel  # float noise is ~1e-7
