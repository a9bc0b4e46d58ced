"""Zero terminal SNR (sspo.make_schedule, CogVideoX) against diffusers' schedulers."""

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, DDPMScheduler

import sspo

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
