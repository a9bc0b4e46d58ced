"""replay.py: the checkpoint pool's distribution and resume, the reference network (full
fine-tuning and LoRA without touching the policy), the losers of an update (``Losers``), and
DDIM+CFG sampling against diffusers' own StableDiffusionPipeline / AnimateDiffPipeline."""
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import (AnimateDiffPipeline, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       StableDiffusionPipeline, UniPCMultistepScheduler)

import models
from models import animatediff, sd15
import noise
from replay import CheckpointPool, Losers, Reference
from models import sampling
from models.sampling import sample as sample_losers


def _state(seed, keys=("a", "b")):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(3, 4, generator=g) for k in keys}


# ----------------------------------------------------------------------------- pool

def test_pool_strategies_frequencies():
    pools = {s: CheckpointPool(s, seed=7) for s in ("uniform", "initial", "last")}
    for p in pools.values():
        for i in range(5):
            assert p.add(_state(i), step=100 * i) == i
    draws = torch.tensor([pools["uniform"].choose(s) for s in range(20000)])
    counts = torch.bincount(draws, minlength=5).double()
    # each of the 5 checkpoints (the initial one included) ~ 4000 +- 57 (binomial sd): 5 sd margin
    assert counts.shape == (5,) and (counts - 4000).abs().max() < 5 * (20000 * 0.2 * 0.8) ** 0.5
    assert all(pools["initial"].choose(s) == 0 for s in range(200))
    assert all(pools["last"].choose(s) == 4 for s in range(200))
    assert pools["uniform"].steps == [0, 100, 200, 300, 400] and len(pools["uniform"]) == 5
    other = CheckpointPool("uniform", seed=8)
    for i in range(5):
        other.add(_state(i), step=i)
    assert [other.choose(s) for s in range(50)] != [pools["uniform"].choose(s) for s in range(50)]
    with pytest.raises(RuntimeError, match="empty"):
        CheckpointPool().choose(0)
    with pytest.raises(ValueError, match="strategy"):
        CheckpointPool("random")


@pytest.mark.parametrize("storage", ["memory", "memory_bf16", "disk"])
def test_pool_resume_same_choices_and_weights(storage, tmp_path):
    pool = CheckpointPool("uniform", seed=3, storage=storage, directory=str(tmp_path / "pool"))
    states = [_state(i) for i in range(4)]
    for i, s in enumerate(states):
        pool.add(s, step=10 * i)
    states[0]["a"].add_(1.0)  # later in-place training updates must not leak into stored snapshots
    (tmp_path / "ckpt.json").write_text(json.dumps(pool.state_dict()))  # plain JSON: names of files
    resumed = CheckpointPool("uniform", seed=0, storage=storage, directory=str(tmp_path / "pool"))
    resumed.load_state_dict(json.loads((tmp_path / "ckpt.json").read_text()))
    assert [resumed.choose(s) for s in range(300)] == [pool.choose(s) for s in range(300)]
    assert resumed.steps == [0, 10, 20, 30]
    for i in range(4):
        got, want = resumed.get(i), _state(i)
        if storage == "memory_bf16" and i > 0:  # checkpoint 0 stays exact (next test)
            assert got["a"].dtype == torch.bfloat16 and torch.equal(got["a"], want["a"].bfloat16())
        else:
            assert got["a"].dtype == torch.float32 and all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- reference

def _inputs(B=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 1, 8, 8, generator=g), torch.tensor([50, 800][:B]), torch.randn(B, 77, 64, generator=g)


def _train_step(bundle, seed):
    """One optimizer update of the trainable weights on a random target."""
    x, t, emb = _inputs()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(bundle.trainable_parameters(), lr=1e-3)  # moves every weight ~lr
    loss = (models.unet_forward(bundle, bundle.unet, x, t, emb) - torch.randn(x.shape, generator=g)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def _policy(bundle):
    x, t, emb = _inputs()
    with torch.no_grad():
        return models.unet_forward(bundle, bundle.unet, x, t, emb)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_reference_reproduces_snapshots_and_leaves_policy_alone(lora_rank):
    bundle = models.build_model("digits", lora_rank=lora_rank)
    pool, outs = CheckpointPool("uniform"), []
    for k in range(3):  # checkpoints 0 (initial), 1, 2 with their policy outputs
        if k:
            _train_step(bundle, seed=k)
        pool.add(bundle.trainable_state_dict(), step=k)
        outs.append(_policy(bundle))
    _train_step(bundle, seed=9)  # the policy moves on past the last snapshot
    policy_out = _policy(bundle)
    assert not torch.allclose(outs[2], policy_out, atol=1e-4) and not torch.allclose(outs[0], outs[1], atol=1e-4)
    flags = {n: p.requires_grad for n, p in bundle.unet.named_parameters()}
    trainable = bundle.trainable_parameters()

    ref = Reference(bundle)
    assert (ref.unet is bundle.unet) == bool(lora_rank)  # LoRA: no second UNet
    x, t, emb = _inputs()
    bundle.unet.train()
    for k in (2, 0, 1):
        ref.load(pool.get(k))
        assert torch.equal(ref(x, t, emb), outs[k])  # exactly that checkpoint's outputs
    # the policy: same outputs, same trainable set, same requires_grad, same mode and adapter
    assert torch.equal(_policy(bundle), policy_out)
    assert {n: p.requires_grad for n, p in bundle.unet.named_parameters() if n in flags} == flags
    assert [id(p) for p in bundle.trainable_parameters()] == [id(p) for p in trainable]
    assert bundle.unet.training and all(m.training for m in bundle.unet.modules())
    if lora_rank:
        assert bundle.unet.active_adapters() == ["default"]
    out = models.unet_forward(bundle, bundle.unet, x, t, emb)
    assert out.requires_grad  # grad flows to the policy after a reference call
    out.sum().backward()
    assert all(p.grad is not None for p in bundle.trainable_parameters())
    assert all(p.grad is None for p in ref.unet.parameters() if p not in set(trainable))
    with pytest.raises(ValueError, match="trainable weights"):
        ref.load({"nope": torch.zeros(1)})


def test_bf16_pool_keeps_checkpoint_0_exact():
    """memory_bf16 halves later snapshots, but checkpoint 0 (the initial model: Diffusion-DPO's
    fixed reference) is stored exactly, so the reference reproduces the initial model bitwise."""
    bundle = models.build_model("digits")
    initial_out = _policy(bundle)
    pool = CheckpointPool("uniform", storage="memory_bf16")
    pool.add(bundle.trainable_state_dict(), step=0)
    _train_step(bundle, seed=1)
    pool.add(bundle.trainable_state_dict(), step=1)
    later_out = _policy(bundle)
    _train_step(bundle, seed=2)
    assert all(v.dtype == torch.float32 for v in pool.get(0).values())
    assert all(v.dtype == torch.bfloat16 for v in pool.get(1).values())  # the memory saving stays
    ref = Reference(bundle)
    x, t, emb = _inputs()
    ref.load(pool.get(0))
    assert torch.equal(ref(x, t, emb), initial_out)
    ref.load(pool.get(1))  # a later snapshot: close to, not equal to, what was stored
    out = ref(x, t, emb)
    assert not torch.equal(out, later_out) and torch.allclose(out, later_out, atol=0.05 * later_out.abs().max())


# ----------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return sd15.write_tiny(str(root / "sd15")), animatediff.write_tiny_motion_adapter(str(root / "motion"))


# Each scheduler name -> the diffusers class a user would hand the pipeline (built here, not by models/sampling.py).
PIPELINE_SCHEDULERS = {"ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler,
                       "unipc": UniPCMultistepScheduler, "euler": EulerDiscreteScheduler}


@pytest.mark.parametrize("scheduler,guidance", [("ddim", 3.0), ("ddim", 1.0), ("dpmsolver++", 3.0),
                                                ("unipc", 3.0), ("euler", 3.0), ("euler", 1.0)])
def test_sample_losers_equals_stable_diffusion_pipeline(tiny_dirs, scheduler, guidance):
    bundle = models.build_model("sd15", tiny_dirs[0], lora_rank=2)
    _perturb_lora(bundle)
    ref = Reference(bundle)
    ref.load(bundle.trainable_state_dict())
    prompts = ["a red cube on a table", "a cat"]
    ours = sample_losers(bundle, ref, prompts, num_inference_steps=4, guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(5), latent_shape=(4, 8, 8),
                         scheduler=scheduler)
    pipe_scheduler = PIPELINE_SCHEDULERS[scheduler].from_config(bundle.scheduler_config)
    if scheduler == "dpmsolver++":
        assert pipe_scheduler.config.algorithm_type == "dpmsolver++"  # the class's default variant
    pipe = StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                                   unet=bundle.unet, scheduler=pipe_scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, height=64, width=64, num_inference_steps=4, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert ours.shape == theirs.shape == (2, 4, 8, 8)
    assert torch.equal(ours, theirs)  # same ops in the same order: bitwise
    again = sample_losers(bundle, ref, prompts, num_inference_steps=4, guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(6), latent_shape=(4, 8, 8),
                          scheduler=scheduler)
    assert not torch.allclose(ours, again, atol=1e-3)  # the seed matters
    if scheduler != "ddim":  # the choice matters: another solver gives other samples
        ddim = sample_losers(bundle, ref, prompts, num_inference_steps=4, guidance_scale=guidance,
                             generator=torch.Generator().manual_seed(5), latent_shape=(4, 8, 8))
        assert not torch.allclose(ours, ddim, atol=1e-4)


def _perturb_lora(bundle):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bundle.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_sample_losers_equals_animatediff_pipeline(tiny_dirs):
    sd_dir, motion_dir = tiny_dirs
    bundle = models.build_model("animatediff", sd_dir, motion_adapter_path=motion_dir, num_frames=3)
    ref = Reference(bundle)
    ref.load(bundle.trainable_state_dict())
    prompts = ["a bird flying", "waves"]
    ours = sample_losers(bundle, ref, prompts, num_inference_steps=3, guidance_scale=4.0,
                         generator=torch.Generator().manual_seed(1), latent_shape=(4, 3, 8, 8))
    pipe = AnimateDiffPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                               unet=bundle.unet, motion_adapter=None,
                               scheduler=DDIMScheduler.from_config(bundle.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, num_frames=3, height=64, width=64, num_inference_steps=3, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(1), output_type="latent").frames
    assert ours.shape == theirs.shape == (2, 4, 3, 8, 8)  # (B,C,F,h,w)
    assert torch.equal(ours, theirs)  # same ops in the same order: bitwise


def test_sample_losers_digits_pixel_space():
    bundle = models.build_model("digits")
    ref = Reference(bundle)
    ref.load(bundle.trainable_state_dict())
    kw = dict(num_inference_steps=3, guidance_scale=3.0, latent_shape=(1, 8, 8))
    a = sample_losers(bundle, ref, ["a handwritten digit three"] * 2, generator=torch.Generator().manual_seed(0), **kw)
    b = sample_losers(bundle, ref, ["a handwritten digit three"] * 2, generator=torch.Generator().manual_seed(0), **kw)
    assert a.shape == (2, 1, 8, 8) and torch.equal(a, b) and not a.requires_grad and torch.isfinite(a).all()
    assert not torch.allclose(a[0], a[1])  # one noise draw per sample


# ----------------------------------------------------------------------------- the losers of an update

def _losers_world(every, group, grad_accum, replayed=True):
    """A digits model whose pool holds 3 different snapshots; choose(step) = step % 3, so every
    update would draw another checkpoint if the cycle did not hold its own."""
    bundle = models.build_model("digits")
    pool = CheckpointPool("uniform", seed=0)
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        pool.add({n: p.detach() + 0.05 * k * torch.randn(p.shape, generator=g)
                  for n, p in bundle.unet.named_parameters() if bundle.is_trainable(n)}, k)
    pool.choose = lambda step: step % 3
    shape, cpu = (1, 8, 8), torch.device("cpu")
    process = noise.Process.from_config(bundle.scheduler_config, cpu)
    losers = Losers(pool=pool, reference=Reference(bundle), replayed=replayed, every=every, group=group,
                    grad_accum=grad_accum, sample=dict(num_inference_steps=2, guidance_scale=3.0, scheduler="ddim"),
                    seed=5, shape=shape, process=process, device=cpu)
    prompts = ["a handwritten digit one", "a handwritten digit two"]

    def stream():
        i = 0
        while True:  # micro-batch i: two items with dataset indices 2i, 2i + 1
            yield {"prompt": prompts, "index": torch.tensor([2 * i, 2 * i + 1]), "x0_w": torch.zeros(2, *shape),
                   "x0_l": torch.full((2, *shape), -1.0)}
            i += 1
    return SimpleNamespace(bundle=bundle, pool=pool, losers=losers, stream=stream(), shape=shape, process=process)


def test_losers_cycle_and_reference(monkeypatch):
    """loser_every = 2, loser_batch = 2 micro-batches, grad_accum = 3: update 4 draws checkpoint
    4 % 3 = 1 and samples the losers of micro-batches (0, 1) in one call and of 2 in another;
    update 5 keeps checkpoint 1 and the very same pairs (no sampling); update 6 starts a new
    cycle with checkpoint 0. Each loser equals the drawn checkpoint's sample from the z_T keyed
    by (seed, the cycle's first update, dataset index)."""
    w = _losers_world(every=2, group=2, grad_accum=3)
    calls, real = [], sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda b, f, prompts, **k: calls.append(len(prompts)) or real(b, f, prompts, **k))
    assert w.losers.begin(4) == 1
    first = [w.losers.next_batch(w.stream, m) for m in range(3)]
    assert calls == [4, 2]  # two micro-batches in one call, then the last one
    assert [b["index"].tolist() for b in first] == [[0, 1], [2, 3], [4, 5]]
    checkpoint = models.build_model("digits")
    models.load_trainable(checkpoint, w.pool.get(1))
    for b in first:
        z_T = noise.pair_noise(5, 4, b["index"], w.shape, w.process)[2]
        want = real(checkpoint, sampling.policy_denoiser(checkpoint), b["prompt"], latents=z_T,
                    latent_shape=w.shape, num_inference_steps=2, guidance_scale=3.0, scheduler="ddim")
        torch.testing.assert_close(b["x0_l"], want, rtol=1e-4, atol=1e-5)
    assert w.losers.begin(5) == 1  # the cycle's checkpoint, not choose(5) = 2
    again = [w.losers.next_batch(w.stream, m) for m in range(3)]
    assert calls == [4, 2] and all(a is b for a, b in zip(first, again))
    assert w.losers.begin(6) == 0
    new = w.losers.next_batch(w.stream, 0)
    assert calls == [4, 2, 4] and new["index"].tolist() == [6, 7]
    w.losers.loaded = 2  # a reference that holds another checkpoint never scores these losers
    with pytest.raises(RuntimeError, match="made by checkpoint 0"):
        w.losers.next_batch(w.stream, 1)


def test_losers_of_data_pairs_pass_through_and_used_once_batches_are_released():
    """Diffusion-DPO-style: the data's own loser, the drawn (initial) checkpoint loaded, nothing
    sampled. SSPO with loser_every = 1: a micro-batch's pixels and losers are not held after use."""
    w = _losers_world(every=1, group=1, grad_accum=2, replayed=False)
    assert w.losers.begin(1) == 1 and w.losers.loaded == 1
    b = w.losers.next_batch(w.stream, 0)
    assert torch.equal(b["x0_l"], torch.full((2, *w.shape), -1.0))
    w = _losers_world(every=1, group=1, grad_accum=2)
    w.losers.begin(3)
    b = w.losers.next_batch(w.stream, 0)
    assert b["x0_l"].shape == (2, *w.shape) and not torch.equal(b["x0_l"], torch.full((2, *w.shape), -1.0))
    assert w.losers.batches == [None]
    sft = Losers(pool=None, reference=None, replayed=False)
    assert sft.begin(0) is None and sft.next_batch(iter([{"prompt": ["a"]}]), 0) == {"prompt": ["a"]}
