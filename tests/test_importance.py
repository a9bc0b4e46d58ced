"""The DPO-C&M / SDPO pair weight (importance.py, this project's reading of the SDPO abstract):
the estimator log E_q[w] against a Monte Carlo of the two Gaussian reverse steps, the cap
applied once after the sum, the coefficients of DDPM eps / v and flow velocity, the rounding
floor, and SDPO's normaliser over a whole update."""

import pytest
import torch

import importance
import noise
import sspo
from models import cogvideox

COGVIDEOX_D = 16 * 13 * 60 * 90  # CogVideoX-2B latents at 49 frames, 480x720: 1,123,200 values


def _reverse_step(x_t, eps_hat, t, sch):
    """A DDPM reverse step p(x_{t-1}|x_t) from an eps prediction: mean and variance (posterior
    variance, abar_{-1} := abar_0 at t = 0, as importance.importance_coef reads it). float64."""
    b, a, ab = (sch[k].double() for k in ("betas", "alphas", "alphas_cumprod"))
    ab_prev = torch.cat([ab[:1], ab[:-1]])
    bt, at, abt, abp = (v[t].view(-1, *([1] * (x_t.ndim - 1))) for v in (b, a, ab, ab_prev))
    mean = (x_t - bt / (1 - abt).sqrt() * eps_hat) / at.sqrt()
    return mean, (bt * (1 - abp) / (1 - abt)).expand_as(x_t)


def _as_pred(eps_hat, x_t, t, abar, prediction_type):
    """The same prediction in the network's own parametrisation (eps or v)."""
    if prediction_type == "epsilon":
        return eps_hat
    a = abar[t].view(-1, 1)
    x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    return a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_estimator_is_log_expected_ratio_not_expected_log(prediction_type):
    """A pair (winner, loser) of D = 16 values at t = 5: log E_q[w_w w_l], x_{t-1} ~ q(.|x_t, x0)
    drawn 400,000 times per image from the exact Gaussians, equals the closed form
    2 kappa_t D (c_w + c_l); exp(E_q[log w]) = exp(-kappa_t D (m - r)) misses the drift term
    kappa_t D mean(delta^2) (0.5 nats per image here), far beyond the Monte Carlo error."""
    sch = sspo.make_schedule()
    abar = sch["alphas_cumprod"].double()
    g = torch.Generator().manual_seed(3)
    B, D, N = 2, 16, 400_000
    t = torch.tensor([5, 5])
    x0, eps = torch.randn(B, D, generator=g).double(), torch.randn(B, D, generator=g).double()
    x_t = sspo.q_sample(x0, t, eps, abar)
    kappa_eps = importance.importance_coef(t, sch).double()  # (B,)
    eps_b = eps + 0.3 * torch.randn(B, D, generator=g).double()
    drift = torch.randn(B, D, generator=g).double()
    drift = drift * (0.5 / (kappa_eps[:, None] * drift.pow(2).sum(1, keepdim=True))).sqrt()  # kappa ||delta||^2 = 0.5
    eps_th = eps_b + drift
    mu_q, var = _reverse_step(x_t, eps, t, sch)
    mu_b, mu_th = _reverse_step(x_t, eps_b, t, sch)[0], _reverse_step(x_t, eps_th, t, sch)[0]
    x = mu_q + var.sqrt() * torch.randn(N, B, D, generator=g).double()  # (N, B, D)
    log_w = ((-(x - mu_th) ** 2 + (x - mu_b) ** 2) / (2 * var)).sum(2).sum(1)  # (N,) log(w_w w_l)
    mc = torch.logsumexp(log_w, 0) - torch.log(torch.tensor(float(N), dtype=torch.float64))
    target = sspo.training_target(x0, eps, t, abar, prediction_type)
    pred_b, pred_th = (_as_pred(e, x_t, t, abar, prediction_type) for e in (eps_b, eps_th))
    c = importance.cross_term(pred_th, pred_b, target)  # (B,): the winner's and the loser's
    kappa = importance.importance_coef(t, sch, prediction_type)
    got = importance.pair_log_weight(c[:1], c[1:], kappa[:1], num_values=D)
    assert abs(got.item() - mc.item()) < 0.03, (got, mc)
    m, r = sspo.per_sample_error(pred_th, target), sspo.per_sample_error(pred_b, target)
    expected_log = -(kappa * D * (m - r)).sum()  # exp(E_q[log w]): the biased form
    assert abs(expected_log.item() - log_w.mean().item()) < 0.03  # the Gaussians above are right
    assert got.item() - expected_log.item() == pytest.approx(1.0, abs=0.03)  # the drift term, 2 x 0.5


def test_coefficients_v_equals_eps_times_abar_including_t0():
    """kappa for v predictions is lambda_t abar_t at every t with alpha_t > 0, t = 0 included
    (abar_t / alpha_t = 1 there), and finite at a zero-terminal-SNR schedule's last step."""
    sch = sspo.make_schedule()
    t = torch.arange(1000)
    lam = importance.importance_coef(t, sch).double()
    kv = importance.importance_coef(t, sch, "v_prediction").double()
    torch.testing.assert_close(kv, lam * sch["alphas_cumprod"].double(), rtol=1e-6, atol=0)
    b, a, ab = (sch[k].double() for k in ("betas", "alphas", "alphas_cumprod"))
    assert lam[0].item() == pytest.approx((b[0] / (2 * a[0] * (1 - ab[0]))).item(), rel=1e-6)
    assert lam[10].item() == pytest.approx((b[10] / (2 * a[10] * (1 - ab[9]))).item(), rel=1e-6)
    zs = noise.Process.from_config(cogvideox.SCHEDULER).schedule
    k = importance.importance_coef(torch.tensor([0, 500, 999]), zs, "v_prediction")
    assert torch.isfinite(k).all() and (k > 0).all()
    assert importance.importance_coef(torch.tensor([999]), zs, "epsilon").item() == 0  # no reverse mean
    with pytest.raises(ValueError, match="prediction_type"):
        importance.importance_coef(t, sch, "sample")


@pytest.mark.parametrize("t, true_log_w", [(0, -4481.0), (20, -227.0)])
def test_pair_weight_is_summed_then_capped_once(t, true_log_w):
    """CogVideoX at its real latent size: per-value gaps m - r of +1e-2 (winner) and -2e-3
    (loser) give log w = -kappa_t D (1e-2 - 2e-3), far below -60: the pair is masked. Capping
    each image's term first would cancel them (log w = 0 at t = 0, weight 1, kept)."""
    p = noise.Process.from_config(cogvideox.SCHEDULER)
    kappa = p.importance_kappa(torch.tensor([t]))
    c_w, c_l = torch.tensor([-1e-2 / 2]), torch.tensor([2e-3 / 2])  # c = (r - m) / 2 without drift
    uncapped = (-kappa * COGVIDEOX_D * (1e-2 - 2e-3)).item()
    assert uncapped == pytest.approx(true_log_w, rel=0.01)
    lw = importance.pair_log_weight(c_w, c_l, kappa, COGVIDEOX_D)
    assert lw.item() == max(uncapped, -importance.LOG_WEIGHT_CAP)
    m_w, m_l, r_w, r_l = torch.tensor([0.11]), torch.tensor([0.098]), torch.tensor([0.1]), torch.tensor([0.1])
    loss, met = importance.dpo_cm_loss(m_w, m_l, r_w, r_l, lw, tau=0.5, eps_clip=0.2)
    assert met["mask_rate"] == 1 and loss.item() == 0
    # the cap itself: both signs, and never inf
    big = importance.pair_log_weight(torch.tensor([1.0, -1.0]), torch.tensor([1.0, -1.0]), kappa.repeat(2), COGVIDEOX_D)
    assert big.tolist() == [importance.LOG_WEIGHT_CAP, -importance.LOG_WEIGHT_CAP]


def test_ddpm_and_flow_processes_give_the_same_pair_weight_per_unit_coefficient():
    """One weight function: for the same predictions, a DDPM (eps, v) and a flow process differ
    only in kappa_t, beyond the cap too (where the sum is capped, not each term)."""
    from types import SimpleNamespace
    import loop
    g = torch.Generator().manual_seed(5)
    B, S = 3, (4, 8, 16, 16)
    target = torch.randn(2 * B, *S, generator=g)
    ref = target + 0.3 * torch.randn(target.shape, generator=g)
    pred = ref + 0.05 * torch.randn(target.shape, generator=g)
    pred[[0, B]] = ref[[0, B]] + torch.stack([0.5 * (target[0] - ref[0]), -0.2 * (target[B] - ref[B])])  # opposite terms, each beyond the cap
    t = torch.tensor([0, 300, 900])
    D = target[0].numel()
    c_w, c_l = importance.cross_term(pred, ref, target).chunk(2)
    for sc in (dict(_class_name="DDPMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
               cogvideox.SCHEDULER,
               dict(_class_name="FlowMatchEulerDiscreteScheduler", shift=3.0)):
        p = noise.Process.from_config(sc)
        run = SimpleNamespace(noise=p, cfg=SimpleNamespace(weight_temperature=1.0))
        got = loop.pair_log_weight(run, pred, ref, target, t)
        kappa = p.importance_kappa(t)
        want = (2 * kappa * D * (c_w + c_l)).clamp(-importance.LOG_WEIGHT_CAP, importance.LOG_WEIGHT_CAP)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert got[0] == importance.LOG_WEIGHT_CAP  # the sum is capped; the two terms do not cancel


def test_rounding_floor_guards_weights_below_bf16_resolution():
    """CogVideoX at t = 0 (kappa_t D ~ 5.6e5): a drift of 1e-3 per value, computed from
    bf16-rounded unit-size predictions, gives a log weight several nats off the exact one;
    it lies within the rounding floor, so the guarded weight is 1. In float32 the same
    cross term is resolved and kept."""
    p = noise.Process.from_config(cogvideox.SCHEDULER)
    kappa = p.importance_kappa(torch.tensor([0]))
    g = torch.Generator().manual_seed(6)
    D = COGVIDEOX_D
    target = torch.randn(2, D, generator=g)
    ref = target + 0.3 * torch.randn(2, D, generator=g)
    pred = ref + 1e-3 * torch.randn(2, D, generator=g) + 1e-6 * (target - ref)  # small, towards the target
    exact = importance.cross_term(pred.double(), ref.double(), target.double())
    want = importance.pair_log_weight(exact[:1].float(), exact[1:].float(), kappa, D)
    lo = [x.bfloat16() for x in (pred, ref)]
    c16 = importance.cross_term(lo[0], lo[1], target)
    floor16 = importance.rounding_floor(*lo)
    assert ((c16 - exact).abs() <= floor16).all()  # the floor bounds the rounding error
    unguarded = importance.pair_log_weight(c16[:1], c16[1:], kappa, D)
    assert (unguarded - want).abs() > 1.0  # without the floor: nats of rounding in the weight
    guarded = importance.pair_log_weight(c16[:1], c16[1:], kappa, D, floor=floor16.sum())
    assert guarded.item() == 0
    c32 = importance.cross_term(pred, ref, target)
    floor32 = importance.rounding_floor(pred, ref)
    assert (floor32 < 1e-6 * exact.abs()).all()
    lw32 = importance.pair_log_weight(c32[:1], c32[1:], kappa, D, floor=floor32.sum())
    assert lw32.item() == pytest.approx(want.item(), rel=1e-3) and lw32.item() != 0


def test_pair_weight_sign_temperature_and_checks():
    c = torch.tensor([1e-4, -1e-4, 0.0])
    kappa = torch.tensor([0.5, 0.5, 0.5])
    lw = importance.pair_log_weight(c, c, kappa, 64)
    torch.testing.assert_close(lw, 2 * 0.5 * 64 * 2 * c)
    assert lw[0] > 0 > lw[1] and lw[2] == 0  # towards the target: w > 1; on-policy: exactly 1
    torch.testing.assert_close(importance.pair_log_weight(c, c, kappa, 64, temperature=0.25), 0.25 * lw)
    x = torch.rand(4, 8, requires_grad=True)
    assert not importance.cross_term(x, x.detach() + 1, x.detach()).requires_grad
    assert not importance.pair_log_weight(c.requires_grad_(), c, kappa, 64).requires_grad
    with pytest.raises(ValueError, match="num_values"):
        importance.pair_log_weight(c, c, kappa, 0)
    with pytest.raises(ValueError, match="temperature"):
        importance.pair_log_weight(c, c, kappa, 64, temperature=-1.0)


def test_sdpo_normaliser_over_micro_batches_equals_one_batch():
    """Four micro-batches of 2 pairs with the update-wide normaliser (the mean kept clipped
    weight of all 8, importance.kept_weight_sum) give the losses of one batch of 8; at B = 1 the
    weight w / norm is not 1 (a batch-local normaliser would make it 1: Diffusion-DPO)."""
    g = torch.Generator().manual_seed(7)
    m_w, m_l, r_w, r_l = (0.1 + 1e-3 * torch.randn(8, generator=g) for _ in range(4))
    log_w = torch.tensor([-0.5, -0.2, -0.05, 0.0, 0.03, 0.08, 0.3, -3.0])
    kw = dict(tau=0.5, eps_clip=0.1)
    whole, _ = importance.sdpo_loss(m_w, m_l, r_w, r_l, log_w, **kw)
    total = sum(importance.kept_weight_sum(log_w[i:i + 2], **kw) for i in range(0, 8, 2))
    norm = total[0] / total[1]
    parts = torch.cat([importance.sdpo_loss(m_w[i:i + 2], m_l[i:i + 2], r_w[i:i + 2], r_l[i:i + 2],
                                            log_w[i:i + 2], norm=norm, **kw)[0] for i in range(0, 8, 2)])
    torch.testing.assert_close(parts, whole)
    dpo = sspo.dpo_loss(m_w, m_l, r_w, r_l)[0]
    one = importance.sdpo_loss(m_w[:1], m_l[:1], r_w[:1], r_l[:1], log_w[:1], norm=norm, **kw)[0]
    assert one.item() == pytest.approx((0.9 / norm * dpo[0]).item(), rel=1e-6) and abs(one.item() - dpo[0].item()) > 1e-3
    local = importance.sdpo_loss(m_w[:1], m_l[:1], r_w[:1], r_l[:1], log_w[:1], **kw)[0]
    assert local.item() == dpo[0].item()  # batch-local at B = 1: w / w = 1


def test_preset_temperatures_are_the_calibrated_ones():
    """Each preset's weight_temperature is research.pair_weights.calibrated_temperature for its
    family's real latent size, beta and noise process (to the 2 digits the presets keep)."""
    from research import pair_weights
    for name, preset, sc, shape, _ in pair_weights.FAMILIES:
        got = pair_weights.settings(preset, "sdpo")["weight_temperature"]
        assert got == pytest.approx(pair_weights.calibrated_temperature(preset, sc, shape), rel=0.02), name
