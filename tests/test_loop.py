"""loop.training_step against an independent recomputation: the reference network and the loser
sampler are the *drawn* checkpoint (not the policy), winners come first in Diffusion-DPO, and
the SSPO loss is Appendix B.5's pseudocode. No end-to-end run: one digits UNet, a pool of two
different snapshots, and a hand-made Run with only the fields training_step reads."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import config
import loop
import noise
import models
from models import sampling
import sspo
from replay import CheckpointPool, Losers, Reference

B, SHAPE, STEP = 4, (1, 8, 8), 3
_REAL_SAMPLE = sampling.sample  # the sampler itself, for the independent recomputation
PROMPTS = ["a handwritten digit three", "the number seven", "a handwritten digit zero", ""]


def _perturb(bundle, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bundle.trainable_parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))


def _checkpoint_net(snapshot):
    """An independent digits model holding ``snapshot``: no Reference, no adapter switching."""
    net = models.build_model("digits")
    models.load_trainable(net, snapshot)
    return net.unet.eval()


@pytest.fixture(scope="module")
def world():
    """A policy that moved on past two pool snapshots: 0 (initial) and 1, all three different."""
    bundle = models.build_model("digits")
    pool = CheckpointPool("uniform", seed=0)
    pool.add(bundle.trainable_state_dict(), 0)
    _perturb(bundle, seed=1)
    pool.add(bundle.trainable_state_dict(), 1)
    _perturb(bundle, seed=2)
    reference = Reference(bundle)
    nets = [_checkpoint_net(pool.get(k)) for k in range(2)]
    g = torch.Generator().manual_seed(0)
    batch = {"prompt": PROMPTS, "x0_w": torch.rand(B, *SHAPE, generator=g) * 2 - 1,
             "x0_l": torch.rand(B, *SHAPE, generator=g) * 2 - 1, "index": torch.tensor([5, 17, 2, 40])}
    return SimpleNamespace(bundle=bundle, pool=pool, reference=reference, nets=nets, batch=batch)


def _run(world, kind, drawn, **cfg):
    """What training_step reads of a loop.Run; its replay.Losers draws pool entry ``drawn``."""
    sc, cpu = world.bundle.scheduler_config, torch.device("cpu")
    c = config.Config(**{"beta": 500.0, "loser_steps": 3, "loser_guidance": 3.0, **cfg})
    method, process = config.METHODS[kind], noise.Process.from_config(sc, cpu)
    losers = Losers(pool=SimpleNamespace(choose=lambda step: drawn, get=world.pool.get), reference=world.reference,
                    replayed=method.losers == "replayed", seed=c.seed, shape=SHAPE, process=process, device=cpu,
                    sample=dict(num_inference_steps=c.loser_steps, guidance_scale=c.loser_guidance,
                                scheduler=c.loser_scheduler))
    return SimpleNamespace(cfg=c, bundle=world.bundle, policy=world.bundle.unet, reference=world.reference,
                           ctx=SimpleNamespace(device=cpu), autocast=contextlib.nullcontext,
                           shape=SHAPE, noise=process, method=method, losers=losers)


def _step(run, batch):
    """One micro-step as loop.update takes it: the update's reference and losers, then the loss."""
    run.losers.begin(STEP)
    return loop.training_step(run, run.losers.next_batch(iter([batch]), 0), STEP)


@pytest.fixture
def spy(monkeypatch):
    """Records what training_step feeds q_sample (x0, t, eps) and the sampler (its arguments
    and its output), calling the real functions."""
    seen = {}
    real_q, real_sample = sspo.q_sample, sampling.sample

    def q_sample(x0, t, eps, abar):
        seen.update(x0=x0.clone(), t=t.clone(), eps=eps.clone())
        return real_q(x0, t, eps, abar)

    def sample(bundle, denoise_fn, prompts, **kw):
        out = real_sample(bundle, denoise_fn, prompts, **kw)
        seen.update(sample_kw=kw, sample_prompts=list(prompts), losers=out.clone())
        return out

    monkeypatch.setattr(sspo, "q_sample", q_sample)
    monkeypatch.setattr(sampling, "sample", sample)
    return seen


def _errors(world, net, seen):
    """Per-sample errors of ``net`` on [the batch's winners; the losers (the data's, or the
    sampler's output)] at the step's (t, eps), recomputed from first principles:
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, epsilon target, mean over values."""
    x0 = torch.cat([world.batch["x0_w"], seen.get("losers", world.batch["x0_l"])])
    t, eps = seen["t"], seen["eps"]
    abar = sspo.make_schedule()["alphas_cumprod"][t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    with torch.no_grad():
        text = models.encode_prompts(world.bundle, PROMPTS * 2)  # (2B,77,D): [winners; losers]
        pred = net(x_t, t, encoder_hidden_states=text).sample
    return (pred - eps).pow(2).mean(dim=(1, 2, 3)).chunk(2)  # (2B,) -> (B,) winners, (B,) losers


def _dpo_by_hand(m_w, m_l, r_w, r_l, beta):
    return -F.logsigmoid(-0.5 * beta * ((m_w - m_l) - (r_w - r_l)))


def _b5_by_hand(m_w, m_l, r_w, r_l, beta):
    """[SSPO] Appendix B.5 re-typed: sign = +1 where the policy is worse on the winner."""
    sign = torch.where(m_w - r_w > 0, 1.0, -1.0)
    return -F.logsigmoid(-0.5 * beta * ((m_w + sign * m_l) - (r_w + sign * r_l)))


def test_shared_noise_and_winners_first(world, spy):
    run = _run(world, "dpo", drawn=0)
    _step(run, world.batch)
    t, eps, x0 = spy["t"], spy["eps"], spy["x0"]
    assert torch.equal(t[:B], t[B:]) and torch.equal(eps[:B], eps[B:])  # one (t, eps) per pair
    assert torch.equal(x0[:B], world.batch["x0_w"]) and torch.equal(x0[B:], world.batch["x0_l"])


@pytest.mark.parametrize("kind,drawn", [("sspo", 1), ("sspo", 0), ("dpo", 0), ("dpo", 1)])
def test_reference_errors_are_the_drawn_checkpoints(world, spy, monkeypatch, kind, drawn):
    """The loss's r_w, r_l are the drawn checkpoint's errors (not the policy's, not another
    checkpoint's); m_w, m_l are the policy's."""
    got = {}
    real = getattr(sspo, f"{kind}_loss")

    def record(m_w, m_l, r_w, r_l, **kw):
        got.update(m_w=m_w.detach(), m_l=m_l.detach(), r_w=r_w, r_l=r_l)
        return real(m_w, m_l, r_w, r_l, **kw)

    monkeypatch.setattr(sspo, f"{kind}_loss", record)
    run = _run(world, kind, drawn)
    _step(run, world.batch)
    r_w, r_l = _errors(world, world.nets[drawn], spy)
    other_w, _ = _errors(world, world.nets[1 - drawn], spy)
    m_w, m_l = _errors(world, world.bundle.unet, spy)
    # the three networks give clearly different errors, so the comparisons below can tell them apart
    assert (r_w - m_w).abs().min() > 1e-5 and (r_w - other_w).abs().min() > 1e-5
    torch.testing.assert_close(got["r_w"], r_w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["r_l"], r_l, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["m_w"], m_w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["m_l"], m_l, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("drawn", [1, 0])
def test_losers_are_sampled_by_the_drawn_checkpoint(world, spy, drawn):
    """The replayed losers equal DDIM+CFG run by an independent copy of the drawn checkpoint
    from the same z_T, and they are what the loss noises."""
    run = _run(world, "sspo", drawn)
    _step(run, world.batch)
    kw = spy["sample_kw"]
    assert spy["sample_prompts"] == PROMPTS
    assert (kw["num_inference_steps"], kw["guidance_scale"]) == (3, 3.0)
    z_T = kw["latents"]
    nets = [world.nets[drawn], world.nets[1 - drawn], world.bundle.unet]  # drawn, other, policy
    want = [_REAL_SAMPLE(world.bundle, sampling.policy_denoiser(world.bundle, net), PROMPTS, latents=z_T,
                         latent_shape=SHAPE, num_inference_steps=3, guidance_scale=3.0) for net in nets]
    assert (want[0] - want[1]).abs().max() > 1e-3 and (want[0] - want[2]).abs().max() > 1e-3
    torch.testing.assert_close(spy["losers"], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(spy["x0"][B:], want[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(spy["x0"][:B], world.batch["x0_w"])


@pytest.mark.parametrize("beta", [500.0, 5e4])
def test_sspo_step_is_appendix_b5(world, spy, beta):
    """The step's loss is B.5's pseudocode on independently computed errors, with both SSR modes
    in the batch (a flipped sign changes the loss)."""
    run = _run(world, "sspo", drawn=1, beta=beta)
    loss, metrics = _step(run, world.batch)
    m_w, m_l = _errors(world, world.bundle.unet, spy)
    r_w, r_l = _errors(world, world.nets[1], spy)
    s = m_w - r_w > 0
    assert s.any() and (~s).any(), "both SSR modes must occur"
    want = _b5_by_hand(m_w, m_l, r_w, r_l, beta)
    flipped = -F.logsigmoid(-0.5 * beta * ((m_w - torch.where(s, 1.0, -1.0) * m_l)
                                          - (r_w - torch.where(s, 1.0, -1.0) * r_l)))
    assert (want.mean() - flipped.mean()).abs() > 1e-3  # the check below can see a flipped sign
    torch.testing.assert_close(loss.detach(), want.mean(), rtol=1e-4, atol=1e-6)
    assert metrics["ssr_rate"].item() == s.float().mean().item()


@pytest.mark.parametrize("beta", [500.0, 5e4])
def test_dpo_step_prefers_the_winner(world, spy, beta):
    """Diffusion-DPO's loss with the data's winner as winner; swapping winner and loser
    (anywhere: batch order, chunk order, the loss) gives a different number."""
    run = _run(world, "dpo", drawn=0, beta=beta)
    loss, metrics = _step(run, world.batch)
    m_w, m_l = _errors(world, world.bundle.unet, spy)
    r_w, r_l = _errors(world, world.nets[0], spy)
    want, swapped = _dpo_by_hand(m_w, m_l, r_w, r_l, beta), _dpo_by_hand(m_l, m_w, r_l, r_w, beta)
    assert (want.mean() - swapped.mean()).abs() > 1e-3
    torch.testing.assert_close(loss.detach(), want.mean(), rtol=1e-4, atol=1e-6)
    inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))
    assert metrics["implicit_acc"].item() == (inside > 0).float().mean().item()


@pytest.fixture(scope="module")
def sd15_bundle(tmp_path_factory):
    from models import sd15
    return models.build_model("sd15", sd15.write_tiny(str(tmp_path_factory.mktemp("sd15"))))


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_bf16_autocast_noises_float32_latents(sd15_bundle, spy, kind):
    """Under bf16 autocast the VAE returns bf16 latents; the step must noise float32 ones (a
    bf16 schedule rounds abar_t to 1 at small t: no noise at all). Needs a VAE, so tiny sd15."""
    bundle = sd15_bundle
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    batch = {"prompt": ["a cat", "a dog"], "x0_w": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
             "x0_l": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "index": torch.tensor([0, 1])}
    with torch.no_grad(), autocast():
        assert models.encode_pixels(bundle, batch["x0_w"]).dtype == torch.bfloat16  # the hazard is real
    run = SimpleNamespace(cfg=config.Config(method=kind), bundle=bundle, policy=bundle.unet,
                          reference=Reference(bundle) if kind != "sft" else None,
                          ctx=SimpleNamespace(device=torch.device("cpu")), autocast=autocast, shape=(4, 8, 8),
                          noise=noise.Process.from_config(bundle.scheduler_config, torch.device("cpu")),
                          method=config.METHODS[kind])
    loss, _ = loop.training_step(run, batch, 0)
    assert spy["x0"].dtype == spy["eps"].dtype == torch.float32 and torch.isfinite(loss)


# ----------------------------------------------------------------------------- min-SNR weighting (snr_gamma)

@pytest.mark.parametrize("prediction_type,zero_snr", [("epsilon", False), ("v_prediction", False),
                                                      ("v_prediction", True), ("epsilon", True)])
def test_snr_weight_is_min_snr_gamma_of_compute_snr(prediction_type, zero_snr):
    """The weight against its closed form, SNR_t = abar_t / (1 - abar_t) from the schedule:
    min(SNR, gamma) / SNR (epsilon), min(SNR, gamma) / (SNR + 1) (v), and against diffusers'
    compute_snr on a DDPMScheduler of the same config. At zero terminal SNR the epsilon weight is
    its limit 1, the v weight 0; flow matching is refused in one line."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    sc = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    process, gamma = noise.Process.from_config(sc), 5.0
    t = torch.tensor([0, 10, 120, 500, 998, 999])
    abar = sspo.make_schedule(1000, 0.00085, 0.012, "scaled_linear", rescale_betas_zero_snr=zero_snr)["alphas_cumprod"]
    snr = abar[t].double() / (1 - abar[t].double())
    want = snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    if zero_snr:
        want[-1] = 1.0 if prediction_type == "epsilon" else 0.0
    got = process.snr_weight(t, gamma)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert got[0] < 1 and got[3] == pytest.approx(1.0 if prediction_type == "epsilon" else float(snr[3] / (snr[3] + 1)),
                                                    rel=1e-5)  # small t: capped; large t: SNR < gamma
    snr_diffusers = compute_snr(DDPMScheduler(**sc), t)
    torch.testing.assert_close(got[:5], (snr_diffusers.clamp(max=gamma) / (snr_diffusers + 1 if prediction_type ==
                                                                           "v_prediction" else snr_diffusers))[:5])
    flow = noise.Process.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    with pytest.raises(ValueError, match="flow-matching process has none: drop --snr_gamma"):
        flow.snr_weight(t, gamma)


@pytest.mark.parametrize("kind,loss_fn", [("sft", "sft_loss"), ("dpo", "dpo_loss"), ("sspo", "sspo_loss")])
def test_snr_gamma_scales_each_error_by_its_pairs_weight_only(world, spy, monkeypatch, kind, loss_fn):
    """snr_gamma changes nothing but the errors the loss is given: each (m_w, m_l, r_w, r_l) of a
    pair, times the one weight of the pair's t; snr_gamma = 0 (the default) leaves them as they were.
    gamma 0.5: the batch's t (386, 684, 988, 558) has SNR below 5 everywhere, below 0.5 but once."""
    seen = []
    real = getattr(sspo, loss_fn)
    monkeypatch.setattr(sspo, loss_fn, lambda *errs, **kw: (seen.append([e.detach() for e in errs]), real(*errs, **kw))[1])
    losses = [_step(_run(world, kind, drawn=1, **extra), world.batch)[0]
              for extra in ({}, {"snr_gamma": 0.0}, {"snr_gamma": 0.5})]
    plain, off, weighted = seen
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
    w = noise.Process.from_config(world.bundle.scheduler_config).snr_weight(spy["t"][:B], 0.5)  # (B,): one per pair
    assert (w < 1).any() and (w == 1).any()
    for a, b, c in zip(plain, off, weighted):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a * w, rtol=1e-6, atol=0)
