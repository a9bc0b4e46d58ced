"""The one sampler: a diffusers scheduler, classifier-free guidance, in latent space.

The scheduler is one of diffusers' own classes (``SCHEDULERS``: DDIM, DPM-Solver++ multistep,
UniPC multistep, Euler), configured from the model's scheduler config as the pipelines do;
``loser_scheduler`` / ``loser_steps`` / ``loser_guidance`` choose it for replayed losers.

Replayed losers (replay.py's reference as the denoiser), the training run's sample grids and the
digits evaluation all call ``sample``. It follows StableDiffusionPipeline / AnimateDiffPipeline
with ``output_type="latent"`` step for step, and the tests check it against them.
"""
from __future__ import annotations

import inspect

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UniPCMultistepScheduler)
from diffusers.utils.torch_utils import randn_tensor

from models import FAMILIES, Bundle, add_time_ids, cat_extra, encode_prompts, unet_forward, vae_scale_factor


# name -> (diffusers class, config entries that name the variant).
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
}


def make_scheduler(bundle: Bundle, num_inference_steps: int, name: str = "ddim"):
    """Scheduler ``name`` configured from the model's scheduler config, with its timesteps set.

    StableDiffusionPipeline.__init__ forces steps_offset=1 and, where the class has it,
    clip_sample=False on legacy configs (DDIMScheduler's own default clips to [-1,1]); do the
    same so that samples match the pipeline run with that scheduler. A fresh instance per call:
    the multistep solvers keep state (previous model outputs, step index) between steps."""
    factory = getattr(FAMILIES[bundle.family], "make_scheduler", None)  # cogvideox, wan: the pipeline's own
    if factory:
        scheduler = factory(bundle.scheduler_config)
        scheduler.set_timesteps(num_inference_steps, device=bundle.device)
        return scheduler
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown sampler scheduler {name!r}; expected one of {tuple(SCHEDULERS)}.")
    cls, variant = SCHEDULERS[name]
    scheduler = cls.from_config(dict(bundle.scheduler_config, **variant))
    fixes = {"steps_offset": 1}
    if getattr(scheduler.config, "clip_sample", False) is True:
        fixes["clip_sample"] = False
    scheduler = cls.from_config(dict(scheduler.config, **fixes))
    scheduler.set_timesteps(num_inference_steps, device=bundle.device)
    return scheduler


def policy_denoiser(bundle: Bundle, unet=None):
    """``denoise_fn(x_t, t, text_emb, extra=None) -> pred`` running ``unet`` (default: the bundle's own)."""
    unet = bundle.unet if unet is None else unet
    return lambda x, t, emb, extra=None: unet_forward(bundle, unet, x, t, emb, extra)


@torch.no_grad()
def sample(bundle: Bundle, denoise_fn, prompts: list[str], *, num_inference_steps: int = 20,
           guidance_scale: float = 3.0, generator: torch.Generator | None = None,
           latent_shape: tuple, latents: torch.Tensor | None = None,
           scheduler: str = "ddim") -> torch.Tensor:
    """Samples for ``prompts``: ``scheduler`` (a name in SCHEDULERS; DDIM runs with eta 0) with
    classifier-free guidance, in latent space.

    denoise_fn(x_t, t, text_emb[, extra]) -> pred, e.g. a replay ``Reference`` or ``policy_denoiser``;
    ``extra`` (the UNet's added conditioning) is passed only for families that have one (SDXL).
    latent_shape: (C,H,W) for images, (C,F,H,W) for video. ``latents``: the initial noise z_T
    (B, *latent_shape), given instead of ``generator`` when the caller keys noise per item (the
    training loop: the same samples whatever the world size). Returns latents (B, *latent_shape),
    no VAE decode. As the pipelines: noise from ``generator`` of shape (B, *latent_shape), one
    denoiser call per step on [unconditional; conditional] (2B), and
    pred = pred_u + w * (pred_c - pred_u) with the empty prompt as unconditional.
    SDXL as StableDiffusionXLPipeline: the unconditional embeddings and pooled text_embeds are
    zeros when the model says force_zeros_for_empty_prompt (the release does), else the encoding
    of ""; time_ids = (H, W, 0, 0, H, W) in pixels for both halves.
    z_T is scaled by
    the scheduler's init_noise_sigma and each input by scale_model_input (Euler's sigma scaling).
    """
    scheduler = make_scheduler(bundle, num_inference_steps, scheduler)
    # As the pipelines' prepare_extra_step_kwargs: eta only where step() takes it (DDIM, eta 0).
    step_kw = {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
    device = bundle.device
    B = len(prompts)
    cfg = guidance_scale > 1.0  # as the pipelines: guidance 1 means the conditional model alone
    emb, extra = encode_prompts(bundle, prompts, return_extra=True)  # (B,77,D), {} or SDXL's text_embeds
    if cfg:
        if bundle.force_zeros_for_empty_prompt:
            emb_u, extra_u = torch.zeros_like(emb), {k: torch.zeros_like(v) for k, v in extra.items()}
        else:
            emb_u, extra_u = encode_prompts(bundle, [""] * B, return_extra=True)
        emb, extra = torch.cat([emb_u, emb]), cat_extra(extra_u, extra)  # (2B,77,D): [uncond; cond]
    emb = emb.to(device)
    if extra:  # SDXL's micro-conditioning; other families have none
        size = tuple(s * vae_scale_factor(bundle) for s in latent_shape[-2:])  # (H, W) in pixels
        extra = add_time_ids({k: v.to(device) for k, v in extra.items()}, size, (0, 0), size)
    if latents is None:  # z_T from the generator, as the pipelines draw it
        latents = randn_tensor((B, *latent_shape), generator=generator, device=device, dtype=emb.dtype)
    elif tuple(latents.shape) != (B, *latent_shape):
        raise ValueError(f"latents {tuple(latents.shape)} do not match {(B, *latent_shape)}")
    # FlowMatchEulerDiscreteScheduler has neither (WanPipeline uses neither): z_T as drawn
    latents = latents.to(device=device, dtype=emb.dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        x_in = torch.cat([latents] * 2) if cfg else latents  # (2B,*latent_shape)
        if hasattr(scheduler, "scale_model_input"):
            x_in = scheduler.scale_model_input(x_in, t)
        pred = denoise_fn(x_in, t, emb, extra) if extra else denoise_fn(x_in, t, emb)
        if cfg:
            pred_u, pred_c = pred.chunk(2)  # (2B,...) -> (B,...), (B,...)
            pred = pred_u + guidance_scale * (pred_c - pred_u)
        latents = scheduler.step(pred, t, latents, **step_kw, return_dict=False)[0]
    return latents


@torch.no_grad()
def sample_with_policy(bundle: Bundle, prompts: list[str], *, latent_shape: tuple, **kw) -> torch.Tensor:
    """``sample`` run by the bundle's own UNet in eval mode (its train/eval mode is restored)."""
    was_training = bundle.unet.training
    bundle.unet.eval()
    try:
        return sample(bundle, policy_denoiser(bundle), prompts, latent_shape=latent_shape, **kw)
    finally:
        bundle.unet.train(was_training)
