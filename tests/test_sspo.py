"""Identities of the loss math (sspo.py) against diffusers, closed forms and the paper's pseudocode."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

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


def test_no_gradient_through_ssr_sign():
    # d(loss)/d(m_w) must equal the analytic derivative with s held constant
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

def test_importance_lambda_closed_form():
    sch = sspo.make_schedule()
    b, a, ab = sch["betas"].double(), sch["alphas"].double(), sch["alphas_cumprod"].double()
    t = torch.tensor([1, 10, 500, 999])
    want = b[t] / (2 * a[t] * (1 - ab[t - 1]))
    assert torch.allclose(sspo.importance_lambda(t, sch).double(), want, rtol=1e-5)
    # and equals the Gaussian KL between q(x_{t-1}|x_t,x0) and p_theta divided by ||eps - eps_theta||^2
    beta_tilde = (1 - ab[t - 1]) / (1 - ab[t]) * b[t]
    mean_coef = b[t] / (a[t].sqrt() * (1 - ab[t]).sqrt())  # mu_q - mu_p = coef * (eps_theta - eps)
    assert torch.allclose(mean_coef ** 2 / (2 * beta_tilde), want)
    assert torch.isfinite(sspo.importance_lambda(torch.tensor([0]), sch)).all()


@pytest.mark.parametrize("fn", [sspo.dpo_cm_loss, sspo.sdpo_loss])
def test_unit_weights_give_dpo(fn):
    m = _errs(seed=8)
    loss, _ = fn(*m, log_weight=torch.zeros(64), tau=0.5, eps_clip=0.2)
    assert torch.allclose(loss, sspo.dpo_loss(*m)[0])


def test_dpo_cm_tau0_noclip_is_plain_weighting_and_sdpo_self_normalised():
    m = _errs(seed=9)
    logw = -torch.rand(64)
    dpo = sspo.dpo_loss(*m)[0]
    a, _ = sspo.dpo_cm_loss(*m, log_weight=logw, tau=0.0, eps_clip=float("inf"))
    assert torch.allclose(a, logw.exp() * dpo)
    b, _ = sspo.sdpo_loss(*m, log_weight=logw, tau=0.0, eps_clip=float("inf"))
    assert torch.allclose(b, logw.exp() / logw.exp().mean() * dpo)


@pytest.mark.parametrize("fn", [sspo.dpo_cm_loss, sspo.sdpo_loss])
def test_masked_pairs_zero_loss_zero_grad_and_weights_not_differentiated(fn):
    m_w, m_l, r_w, r_l = _errs(seed=10)
    m_w.requires_grad_(True)
    logw = torch.log(torch.linspace(0.05, 1.0, 64)).requires_grad_(True)
    loss, met = fn(m_w, m_l, r_w, r_l, log_weight=logw, tau=0.5, eps_clip=0.2)
    masked = logw.detach().exp() < 0.5
    assert masked.any() and (~masked).any()
    assert (loss[masked] == 0).all() and (loss[~masked] > 0).all()
    assert abs(met["mask_rate"].item() - masked.float().mean().item()) < 1e-6
    loss.sum().backward()
    assert (m_w.grad[masked] == 0).all() and (m_w.grad[~masked] != 0).all()
    assert logw.grad is None  # no gradient flows into importance weights
    if fn is sspo.dpo_cm_loss:  # kept weights are clipped into [0.8, 1.2]
        w = logw.detach().exp().clamp(0.8, 1.2)
        assert torch.allclose(loss[~masked], (w * sspo.dpo_loss(m_w, m_l, r_w, r_l)[0])[~masked])


def test_importance_log_weight_is_detached_and_nonpositive():
    sch = sspo.make_schedule()
    err = torch.rand(8, requires_grad=True)
    t = torch.randint(0, 1000, (8,))
    lw = sspo.importance_log_weight(err, t, sch)
    assert not lw.requires_grad and (lw <= 0).all()
    pl = sspo.pair_log_weight(err, err, t, sch)
    assert torch.allclose(pl, 2 * lw)


# --------------------------------------------------------------------------- dtypes and video

@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_losses_accept_low_precision_and_compute_float32(dt):
    m = _errs(seed=11)
    lo = [x.to(dt) for x in m]
    for fn in (sspo.dpo_loss, sspo.sspo_loss):
        l_lo, _ = fn(*lo)
        l_hi, _ = fn(*[x.float() for x in lo])
        assert l_lo.dtype == torch.float32 and torch.equal(l_lo, l_hi)
    l_lo, _ = sspo.sdpo_loss(*lo, log_weight=torch.zeros(64, dtype=dt))
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


def test_importance_weight_v_prediction_uses_eps_error():
    """eps - eps_theta = sqrt(abar_t) (v - v_theta): the same prediction error measured in v
    space must give the same weight as in eps space."""
    sch = sspo.make_schedule()
    abar = sch["alphas_cumprod"]
    B = 6
    x0, eps = torch.randn(B, 4, 8, 8), torch.randn(B, 4, 8, 8)
    t = torch.tensor([1, 50, 200, 500, 800, 999])
    x_t = sspo.q_sample(x0, t, eps, abar)
    eps_hat = eps + 0.1 * torch.randn_like(eps)  # a model's eps prediction
    a = abar[t].view(-1, 1, 1, 1)
    x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    v_hat = a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat  # the same prediction, in v space
    v = sspo.training_target(x0, eps, t, abar, "v_prediction")
    lw_eps = sspo.importance_log_weight(sspo.per_sample_error(eps_hat, eps), t, sch)
    lw_v = sspo.importance_log_weight(sspo.per_sample_error(v_hat, v), t, sch, "v_prediction")
    assert torch.allclose(lw_eps, lw_v, rtol=1e-3, atol=1e-6)
