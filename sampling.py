"""The one sampler: a diffusers scheduler, classifier-free guidance, in latent space.

Replayed losers (replay.py's reference as the denoiser), the training run's sample grids and the
digits evaluation all call ``sample``. It follows StableDiffusionPipeline / AnimateDiffPipeline
with ``output_type="latent"`` step for step, and the tests check it against them.
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from models import FAMILIES, Bundle, add_time_ids, cat_extra, encode_prompts, unet_forward, vae_scale_factor


def make_scheduler(bundle: Bundle, num_inference_steps: int) -> DDIMScheduler:
    """DDIM configured from the model's scheduler config, with its timesteps set.

    StableDiffusionPipeline.__init__ forces clip_sample=False and steps_offset=1 on legacy
    configs (DDIMScheduler's own default clips to [-1,1]); do the same so that samples match."""
    factory = getattr(FAMILIES[bundle.family], "make_scheduler", None)  # cogvideox, wan: the pipeline's own
    scheduler = factory(bundle.scheduler_config) if factory else \
        DDIMScheduler.from_config(dict(bundle.scheduler_config, clip_sample=False, steps_offset=1))
    scheduler.set_timesteps(num_inference_steps, device=bundle.device)
    return scheduler


def policy_denoiser(bundle: Bundle, unet=None):
    """``denoise_fn(x_t, t, text_emb, extra=None) -> pred`` running ``unet`` (default: the bundle's own)."""
    unet = bundle.unet if unet is None else unet
    return lambda x, t, emb, extra=None: unet_forward(bundle, unet, x, t, emb, extra)


@torch.no_grad()
def sample(bundle: Bundle, denoise_fn, prompts: list[str], *, num_inference_steps: int = 20,
           guidance_scale: float = 3.0, generator: torch.Generator | None = None,
           latent_shape: tuple, latents: torch.Tensor | None = None) -> torch.Tensor:
    """Samples for ``prompts``: DDIM (eta 0) with classifier-free guidance, in latent space.

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
    """
    scheduler = make_scheduler(bundle, num_inference_steps)
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
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]  # DDIM: eta 0 (its default)
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
