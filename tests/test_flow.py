"""Flow matching (flow.py, Wan2.1) and zero terminal SNR (sspo.make_schedule, CogVideoX),
against diffusers' schedulers, closed forms and the Gaussian KL written out by hand."""

import math

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

import importance
import sspo
import flow as fl

SHAPE = (4, 2, 3, 4, 4)  # (B,C,F,H,W): a tiny video


def _x0_eps(shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# --------------------------------------------------------------------- zero terminal SNR, CogVideoX

def test_zero_snr_schedule_equals_ddpm_scheduler():
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        rescale_betas_zero_snr=True)
    ours = sspo.make_schedule(rescale_betas_zero_snr=True)
    for k in ("betas", "alphas", "alphas_cumprod"):
        assert ours[k].dtype == torch.float32 and torch.equal(ours[k], getattr(ref, k)), k
    assert ours["alphas_cumprod"][-1] == 0
    assert ours["alphas_cumprod"][0] == sspo.make_schedule()["alphas_cumprod"][0]


@pytest.mark.parametrize("rescale,shift,kind", [(True, 3.0, "scaled_linear"), (False, 3.0, "scaled_linear"),
                                                (True, 1.0, "scaled_linear"), (True, 2.0, "linear")])
def test_cogvideo_schedule_equals_diffusers(rescale, shift, kind):
    ref = CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=kind,
                                 prediction_type="v_prediction", rescale_betas_zero_snr=rescale,
                                 snr_shift_scale=shift, timestep_spacing="trailing")
    ours = sspo.make_schedule(beta_schedule=kind, rescale_betas_zero_snr=rescale, snr_shift_scale=shift)
    abar = ours["alphas_cumprod"]
    assert abar.dtype == torch.float32 and torch.equal(abar, ref.alphas_cumprod.float())
    # betas/alphas are re-derived from the shifted abar, so the three stay one schedule
    assert torch.allclose(torch.cumprod(ours["alphas"].double(), 0), ref.alphas_cumprod.double(), atol=1e-6)
    assert torch.equal(ours["alphas"], 1 - ours["betas"])
    x0, eps = _x0_eps()
    t = torch.tensor([0, 500, 998, 999])
    assert torch.equal(sspo.q_sample(x0, t, eps, abar), ref.add_noise(x0, eps, t))
    assert torch.equal(sspo.training_target(x0, eps, t, abar, "v_prediction"), ref.get_velocity(x0, eps, t))


def test_cogvideo_zero_snr_terminal_step_is_finite():
    """abar_{T-1} = 0: x_t = eps, v = -x0, and v -> eps gives back eps, with no inf or nan."""
    sched = sspo.make_schedule(rescale_betas_zero_snr=True, snr_shift_scale=3.0)
    abar = sched["alphas_cumprod"]
    assert abar[-1] == 0 and sched["alphas"][-1] == 0 and sched["betas"][-1] == 1
    x0, eps = _x0_eps()
    t_end = torch.full((SHAPE[0],), 999)
    x_t = sspo.q_sample(x0, t_end, eps, abar)
    v = sspo.training_target(x0, eps, t_end, abar, "v_prediction")
    eps_back = sspo.eps_from_v(v, x_t, t_end, abar)
    for z in (x_t, v, eps_back):
        assert torch.isfinite(z).all()
    assert torch.equal(x_t, eps) and torch.equal(v, -x0) and torch.equal(eps_back, eps)
    t = torch.tensor([0, 1, 500, 999])  # round trip everywhere, the ends included
    x_t = sspo.q_sample(x0, t, eps, abar)
    v = sspo.training_target(x0, eps, t, abar, "v_prediction")
    assert torch.allclose(sspo.eps_from_v(v, x_t, t, abar), eps, atol=1e-5)


def test_cogvideo_eps_from_v_equals_ddim_step_epsilon():
    """diffusers' DDIM step with v_prediction forms the same epsilon: check through its output."""
    ref = CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                 snr_shift_scale=3.0, timestep_spacing="trailing", clip_sample=False)
    ref.set_timesteps(4)
    abar = sspo.make_schedule(rescale_betas_zero_snr=True, snr_shift_scale=3.0)["alphas_cumprod"]
    x_t, v = _x0_eps(seed=1)
    t, t_prev = int(ref.timesteps[1]), int(ref.timesteps[2])  # trailing: 999, 749, 499, 249
    tb = torch.full((SHAPE[0],), t)
    x0_hat = abar[t] ** 0.5 * x_t - (1 - abar[t]) ** 0.5 * v
    eps_hat = sspo.eps_from_v(v, x_t, tb, abar)
    expect = abar[t_prev] ** 0.5 * x0_hat + (1 - abar[t_prev]) ** 0.5 * eps_hat  # DDIM, eta = 0
    assert torch.allclose(ref.step(v, t, x_t).prev_sample, expect, atol=1e-5)


def test_zero_snr_schedule_rejects_bad_options():
    with pytest.raises(ValueError, match="snr_shift_scale"):
        sspo.make_schedule(snr_shift_scale=0.0)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        sspo.make_schedule(num_train_timesteps=1, rescale_betas_zero_snr=True)


# --------------------------------------------------------------------- flow: schedule and sampler

@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_flow_sigmas_equal_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ours = fl.flow_sigmas(1000, shift)
    assert ours.dtype == torch.float32 and torch.equal(ours.flip(0), ref.sigmas)
    assert torch.equal(1000 * ours.flip(0), ref.timesteps)  # the model's timestep input
    assert ours[-1] == 1 and ours[0] > 0 and (ours.diff() > 0).all()
    s = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(fl.flow_shift(s, shift), torch.tensor([0.0, shift / (1 + shift), 1.0]))


def test_flow_q_sample_equals_scale_noise_and_closed_forms():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas = fl.flow_sigmas(1000, 3.0)
    x0, eps = _x0_eps()
    t = torch.tensor([0, 10, 500, 999])
    ts = ref.timesteps[999 - t]  # diffusers' table runs from noise to data
    assert torch.equal(fl.flow_q_sample(x0, sigmas[t], eps), ref.scale_noise(x0, ts, eps))
    assert torch.equal(fl.flow_q_sample(x0, torch.zeros(4), eps), x0)
    assert torch.equal(fl.flow_q_sample(x0, torch.ones(4), eps), eps)
    sigma = torch.tensor([0.0, 0.3, 0.8, 1.0])
    x_t, v = fl.flow_q_sample(x0, sigma, eps), fl.flow_target(x0, eps)
    assert torch.equal(v, eps - x0)
    assert torch.allclose(fl.flow_x0_from_v(x_t, v, sigma), x0, atol=1e-6)  # x0 = x_t - sigma v
    assert torch.allclose(fl.flow_eps_from_v(x_t, v, sigma), eps, atol=1e-6)  # eps = x_t + (1-sigma) v
    with pytest.raises(ValueError, match="sigma"):
        fl.flow_q_sample(x0, torch.zeros(3), eps)


def test_flow_euler_step_equals_scheduler_step_and_ddim_eta0():
    ref = FlowMatchEulerDiscreteScheduler(shift=5.0)
    ref.set_timesteps(6)
    x, _ = _x0_eps(seed=2)
    g = torch.Generator().manual_seed(3)
    for i, ts in enumerate(ref.timesteps):
        v = torch.randn(SHAPE, generator=g)
        s, s_next = ref.sigmas[i], ref.sigmas[i + 1]
        ours = fl.flow_euler_step(x, v, s, s_next)
        x = ref.step(v, ts, x).prev_sample
        assert torch.equal(ours, x), i
        ddim = (1 - s_next) * fl.flow_x0_from_v(x_prev := ours - (s_next - s) * v, v, s) \
            + s_next * fl.flow_eps_from_v(x_prev, v, s)
        assert torch.allclose(ddim, ours, atol=1e-5)
    assert ref.sigmas[-1] == 0  # the last step lands on the data


def test_flow_sample_timesteps_density():
    T, B = 1000, 20000
    draw = lambda **kw: fl.flow_sample_timesteps(B, T, generator=torch.Generator().manual_seed(0), **kw)
    uni, ln, ln_noisy = draw(density="uniform"), draw(), draw(logit_mean=1.0)
    for t in (uni, ln, ln_noisy):
        assert t.dtype == torch.long and t.shape == (B,) and 0 <= t.min() and t.max() < T
    assert abs(uni.float().mean() / (T - 1) - 0.5) < 0.02
    middle = lambda t: ((t >= T // 4) & (t < 3 * T // 4)).float().mean()
    assert abs(middle(uni) - 0.5) < 0.02 and abs(middle(ln) - 0.728) < 0.02  # P(|N(0,1)| < logit(3/4))
    assert ln_noisy.float().mean() / T > 0.65  # logit_mean > 0: noisier, as in SD3
    assert torch.equal(ln, draw())
    with pytest.raises(ValueError, match="density"):
        draw(density="mode")


# --------------------------------------------------------------------- flow: losses

def test_flow_sft_loss_is_rectified_flow_objective():
    """sft_loss on velocity errors == Liu et al.'s || (X1 - X0) - u(X_t, t) ||^2 (mean over values)
    with X0 = noise, X1 = data, t = 1 - sigma and u = -v_hat (their time runs the other way)."""
    x0, eps = _x0_eps()
    sigma = torch.tensor([0.1, 0.4, 0.7, 1.0])
    v_hat = torch.randn(SHAPE)
    t_rf = (1 - sigma).reshape(-1, 1, 1, 1, 1)
    x_rf = t_rf * x0 + (1 - t_rf) * eps
    assert torch.allclose(fl.flow_q_sample(x0, sigma, eps), x_rf, atol=1e-6)
    rf = ((x0 - eps) - (-v_hat)).pow(2).flatten(1).mean(1)
    loss, _ = sspo.sft_loss(sspo.per_sample_error(v_hat, fl.flow_target(x0, eps)))
    assert torch.allclose(loss, rf, rtol=1e-5)
    assert sspo.per_sample_error(fl.flow_target(x0, eps), fl.flow_target(x0, eps)).eq(0).all()


def _flow_errors(policy_scale_w=0.5, seed=0):
    """Velocity errors of a pair: reference predicts v + noise, the policy predicts the winner with
    ``policy_scale_w`` times that noise (better for < 1) and the loser as the reference does."""
    g = torch.Generator().manual_seed(seed)
    x0_w, x0_l, eps = (torch.randn(SHAPE, generator=g) for _ in range(3))
    sigma = fl.flow_sigmas(1000, 3.0)[torch.tensor([100, 400, 700, 999])]
    v_w, v_l = fl.flow_target(x0_w, eps), fl.flow_target(x0_l, eps)
    n_w, n_l = (0.3 * torch.randn(SHAPE, generator=g) for _ in range(2))
    pred_w = (v_w + policy_scale_w * n_w).requires_grad_()
    m_w, m_l = sspo.per_sample_error(pred_w, v_w), sspo.per_sample_error(v_l + n_l, v_l)
    r_w, r_l = sspo.per_sample_error(v_w + n_w, v_w), sspo.per_sample_error(v_l + n_l, v_l)
    return pred_w, v_w, sigma, (m_w, m_l, r_w, r_l)


@pytest.mark.parametrize("loss_fn", [sspo.dpo_loss, sspo.sspo_loss])
def test_flow_dpo_sspo_limits_and_sign(loss_fn):
    _, _, _, errs = _flow_errors(policy_scale_w=1.0)  # policy == reference
    assert torch.allclose(loss_fn(*errs, beta=5000.0)[0], torch.full((4,), math.log(2)))
    pred_w, _, _, errs = _flow_errors()
    tiny, _ = loss_fn(*errs, beta=1e-6)  # beta -> 0: log 2, and the gradient vanishes like beta
    assert torch.allclose(tiny, torch.full((4,), math.log(2)), atol=1e-6)
    (g_tiny,) = torch.autograd.grad(tiny.sum(), pred_w, retain_graph=True)
    (g_one,) = torch.autograd.grad(loss_fn(*errs, beta=1.0)[0].sum(), pred_w)
    assert g_tiny.abs().max() <= 2e-6 * g_one.abs().max()
    pred_w, v_w, _, errs = _flow_errors()  # the policy's winner velocity error is lower
    loss, metrics = loss_fn(*errs, beta=50.0)  # beta/2 * gap ~ 1: not saturated
    assert (loss < math.log(2)).all() and metrics["implicit_acc"] == 1
    (g,) = torch.autograd.grad(loss.sum(), pred_w)
    # gradient descent moves the winner's prediction towards its velocity target
    assert ((g * (pred_w - v_w)).flatten(1).sum(1) > 0).all()


def test_flow_loss_weight_maps_velocity_to_eps_errors():
    x0, eps = _x0_eps()
    sigma = torch.tensor([0.0, 0.25, 0.75, 1.0])
    x_t, v_hat = fl.flow_q_sample(x0, sigma, eps), torch.randn(SHAPE)
    err_v = sspo.per_sample_error(v_hat, fl.flow_target(x0, eps))
    err_eps = sspo.per_sample_error(fl.flow_eps_from_v(x_t, v_hat, sigma), eps)
    assert torch.allclose(err_v * fl.flow_loss_weight(sigma, "eps"), err_eps, rtol=1e-5, atol=1e-7)
    assert torch.equal(fl.flow_loss_weight(sigma), torch.ones(4))
    with pytest.raises(ValueError, match="weighting"):
        fl.flow_loss_weight(sigma, "elbo")


# --------------------------------------------------------------------- flow: importance weight

def _posterior(x_t, x0, s_t, s_s):
    """q(x_s | x_t, x0) of the flow's forward process, from the Gaussian-diffusion formulas with
    signal scale a = 1 - sigma and noise scale sigma (Kingma et al. 2021, eq. 2-3 style)."""
    a_t, a_s = 1 - s_t, 1 - s_s
    a_ts, var_ts = a_t / a_s, s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2  # q(x_t | x_s)
    mean = a_ts * s_s ** 2 / s_t ** 2 * x_t + a_s * var_ts / s_t ** 2 * x0
    return mean, var_ts * s_s ** 2 / s_t ** 2


def test_flow_importance_kappa_closed_form():
    # hand-made: (0.5 -> 0.25): 0.25 * 0.5 / (2 * 0.0625) = 1;  (1 -> 0.5): SNR(0.5) / 2 = 0.5
    kappa = fl.flow_importance_kappa(torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.5]))
    assert torch.allclose(kappa, torch.tensor([1.0, 0.5]))
    # kappa ||v - v_hat||^2 = the KL between q(x_s|x_t,x0) and q(x_s|x_t,x0_hat), written out by hand
    x0, eps = _x0_eps(shape=(2, 64))
    s_t, s_s = torch.tensor([[0.6], [0.9]]), torch.tensor([[0.45], [0.2]])
    x_t, v_hat = fl.flow_q_sample(x0, s_t[:, 0], eps), torch.randn(2, 64)
    mu_q, var = _posterior(x_t, x0, s_t, s_s)
    mu_p, _ = _posterior(x_t, fl.flow_x0_from_v(x_t, v_hat, s_t[:, 0]), s_t, s_s)
    kl = ((mu_q - mu_p) ** 2 / (2 * var)).sum(1)
    err = (v_hat - fl.flow_target(x0, eps)).pow(2).sum(1)
    assert torch.allclose(fl.flow_importance_kappa(s_t[:, 0], s_s[:, 0]) * err, kl, rtol=1e-4)
    # = importance.py's DDPM lambda_t on eps errors, for the variance-preserving twin of the flow
    snr = lambda s: (1 - s) ** 2 / s ** 2
    abar_t, abar_s = snr(s_t) / (1 + snr(s_t)), snr(s_s) / (1 + snr(s_s))
    alpha = abar_t / abar_s
    lam = (1 - alpha) / (2 * alpha * (1 - abar_s))
    kappa = fl.flow_importance_kappa(s_t[:, 0], s_s[:, 0])
    assert torch.allclose(kappa, (lam * (1 - s_t) ** 2)[:, 0], rtol=1e-4)


def test_flow_importance_kappa_finite_at_ends_and_plugs_into_losses():
    sigma = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5])
    nxt = torch.tensor([0.0, 0.3, 0.0, 1.0, 0.0])
    kappa = fl.flow_importance_kappa(sigma, nxt)
    assert kappa.shape == (5,) and kappa.dtype == torch.float32
    assert torch.isfinite(kappa).all() and (kappa >= 0).all()
    assert kappa[0] == 0 and kappa[1] == 0 and kappa[3] == 0  # no step taken: weight 1
    table = fl.flow_sigmas(1000, 3.0)
    t = torch.tensor([0, 1, 999])
    assert torch.equal(fl.flow_sigma_next(t, table), torch.stack([torch.tensor(0.0), table[0], table[998]]))
    # pair weight into the losses: all-zero log weight gives DPO; a tiny weight is masked
    _, _, sig, (m_w, m_l, r_w, r_l) = _flow_errors()
    m_w = m_w.detach()
    nxt = fl.flow_sigma_next(torch.tensor([100, 400, 700, 999]), table)
    assert torch.equal(nxt, table[[99, 399, 699, 998]])
    lw_pair = importance.pair_log_weight((r_w - m_w) / 2, (r_l - m_l) / 2, fl.flow_importance_kappa(sig, nxt), 64)
    assert torch.isfinite(lw_pair).all() and (lw_pair > 0).all()  # the policy fits the winner better
    dpo, _ = sspo.dpo_loss(m_w, m_l, r_w, r_l, beta=500.0)
    assert torch.allclose(importance.sdpo_loss(m_w, m_l, r_w, r_l, torch.zeros(4), beta=500.0, tau=0.0,
                                         eps_clip=float("inf"))[0], dpo)
    cm, metrics = importance.dpo_cm_loss(m_w, m_l, r_w, r_l, torch.tensor([0.0, 0.0, 0.0, -30.0]),
                                   beta=500.0, tau=0.5, eps_clip=float("inf"))
    assert cm[3] == 0 and metrics["mask_rate"] == 0.25
