"""The Bundle interface, dispatch to the families, save/load, and the few tensor conversions.

Families, one file each in this folder: ``digits`` (the embedded default, pixel space),
``sd15`` (Stable Diffusion 1.5), ``animatediff`` (SD-1.5 + a MotionAdapter), ``sdxl`` (Stable
Diffusion XL: two text encoders and the added ``text_embeds`` / ``time_ids`` conditioning),
``cogvideox`` and ``wan`` (video transformers). Each knows how to load its parts with
diffusers' and transformers' own classes, and how to write a tiny random-weight stand-in in the
real directory layout: ``load(path, local_files_only, **options) -> Parts`` and
``write_tiny(path, ...) -> str`` (not for digits); families import only ``models.common``
(and one another), never this module. Beside them: ``sampling`` (the one sampler) and
``sharding`` (FSDP2). A family's ``load`` returns its parts; ``build_model`` freezes them, adds LoRA or marks what trains, and returns a
``Bundle``; ``save_model`` writes the diffusers layout that ``build_model`` (and, for sd15 /
animatediff, diffusers' own pipelines) load back.

Each conversion lives in one place: ``encode_prompts`` (text -> ``(B,77,D)``, and with
``return_extra`` SDXL's pooled ``text_embeds``), ``add_time_ids`` (SDXL's size/crop conditioning), ``encode_pixels``
(pixels -> scaled latents), ``decode_latents`` and ``unet_forward`` (which repeats text
embeddings over frames for video, as diffusers 0.42 expects of the caller).
"""
from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

import diffusers
from diffusers import UNetMotionModel

from models import animatediff, cogvideox, digits, sd15, sdxl, wan
from models.common import LORA_TARGETS
from models.sharding import copy_full_, full_tensor

# Loading/saving progress bars of the libraries would drown the training log.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

FAMILIES = {"digits": digits, "sd15": sd15, "animatediff": animatediff, "sdxl": sdxl, "cogvideox": cogvideox,
            "wan": wan}
PIPELINE_CLASS = {"sd15": "StableDiffusionPipeline", "animatediff": "AnimateDiffPipeline",
                  "sdxl": "StableDiffusionXLPipeline", "cogvideox": "CogVideoXPipeline", "wan": "WanPipeline"}
# Video transformer families define their own conversions (forward, encode_prompts, encode_pixels,
# decode_latents, latent_shape, save); the functions below dispatch to them when present.
VIDEO_TRANSFORMERS = ("cogvideox", "wan")


def _hook(bundle, name: str):
    """The family's own version of a conversion, or None (the U-Net families share the code here)."""
    return getattr(FAMILIES[bundle.family], name, None)


@dataclass
class Bundle:
    """Everything a training step needs. Only ``unet`` (or part of it) trains."""
    family: str                  # "digits" | "sd15" | "animatediff" | "sdxl" | "cogvideox" | "wan"
    unet: nn.Module              # policy: UNet2DConditionModel | UNetMotionModel | a video transformer (maybe with LoRA adapter "default")
    text_encoder: nn.Module      # frozen, eval mode
    tokenizer: Any               # CLIPTokenizer, model_max_length 77
    vae: nn.Module | None        # frozen; None for digits (pixel space)
    scheduler_config: dict       # DDPM settings (num_train_timesteps, beta_*, prediction_type, ...)
    lora: bool                   # True: only the LoRA adapter "default" trains
    num_frames: int              # 0 for images
    train_motion_only: bool = False  # animatediff without LoRA: only motion modules train
    text_encoder_2: nn.Module | None = None  # sdxl: CLIPTextModelWithProjection, frozen
    tokenizer_2: Any = None                  # sdxl: its CLIPTokenizer (pads with "!")
    force_zeros_for_empty_prompt: bool = False  # sdxl: guidance's unconditional input is zeros

    def is_trainable(self, name: str) -> bool:
        """Which UNet parameter names a snapshot holds (the rule is by name, so a second
        peft adapter such as replay's "ref" never counts as trainable)."""
        if self.lora:
            return "lora_" in name and ".default." in name
        if self.train_motion_only:
            return "motion_modules" in name
        return True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.unet.named_parameters() if self.is_trainable(n)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached clones of exactly the trainable weights (what a replay snapshot holds); whole
        tensors also under FSDP (gathered: then a collective that every rank calls)."""
        return {n: full_tensor(p.detach()).clone() for n, p in self.unet.named_parameters() if self.is_trainable(n)}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


# ----------------------------------------------------------------------------- build / save

def build_model(family: str, path: str | None = None, *, lora_rank: int = 0, train_motion_only: bool = True,
                gradient_checkpointing: bool = False, local_files_only: bool = True,
                num_frames: int = 16, motion_adapter_path: str | None = None) -> Bundle:
    """Build a ``Bundle``. ``path``: digits -> None (fresh seeded init) or a ``save_model`` dir;
    sd15/animatediff -> a local diffusers directory or a hub repo id (default: the SD-1.5 release).

    ``lora_rank > 0``: freeze the UNet and add a peft LoRA adapter "default" (rank r, alpha r,
    gaussian init, attention projections). Otherwise the full UNet trains, except animatediff
    with ``train_motion_only`` (motion modules only, as AnimateDiff trains them).
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family '{family}'; expected one of {tuple(FAMILIES)}.")
    parts = FAMILIES[family].load(path, local_files_only=local_files_only, motion_adapter_path=motion_adapter_path)
    unet = parts.unet
    if family != "animatediff" and isinstance(unet, UNetMotionModel):
        raise ValueError(f"'{path}' holds a motion UNet; load it with family='animatediff'.")
    if parts.vae is not None:
        parts.vae.requires_grad_(False).eval()
    parts.text_encoder.requires_grad_(False).eval()
    if parts.text_encoder_2 is not None:
        parts.text_encoder_2.requires_grad_(False).eval()

    motion_only = family == "animatediff" and train_motion_only and lora_rank == 0
    unet.requires_grad_(False)
    if lora_rank > 0:
        unet.add_adapter(lora_config(lora_rank), adapter_name="default")
    bundle = Bundle(family=family, unet=unet, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                    vae=parts.vae, scheduler_config=parts.scheduler_config, lora=lora_rank > 0,
                    num_frames=num_frames if family in ("animatediff", *VIDEO_TRANSFORMERS) else 0,
                    train_motion_only=motion_only, text_encoder_2=parts.text_encoder_2,
                    tokenizer_2=parts.tokenizer_2, force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt)
    for p in bundle.trainable_parameters():
        p.requires_grad_(True)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return bundle


def lora_config(rank: int):
    """The LoRA adapter every run trains: rank r, alpha r, gaussian init, attention projections."""
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)


def cast_frozen(bundle: Bundle, dtype: torch.dtype | None) -> None:
    """Keep the frozen modules in ``dtype`` (the autocast dtype of ``mixed_precision``; None: do
    nothing), as diffusers' training scripts hold them in ``weight_dtype``: the text encoders, the
    VAE (but a VAE_FP32 family's stays float32: SDXL's, which overflows in fp16, and Wan's), and the
    UNet's frozen weights (LoRA: the base; animatediff's motion-module training: all but the
    motion modules). The trainable weights stay float32 (``diffusers.training_utils.
    cast_training_params``): the optimizer and the replay snapshots see them unchanged. A full
    fine-tune's frozen reference copy is cast by ``replay.Reference``. Under autocast the matmuls
    and convolutions already ran in ``dtype``; what changes is the memory the weights hold (and
    the ops autocast keeps in float32, e.g. norms, see rounded weights)."""
    if dtype is None:
        return
    for m in (bundle.text_encoder, bundle.text_encoder_2):
        if m is not None:
            m.to(dtype)
    if bundle.vae is not None and not getattr(FAMILIES[bundle.family], "VAE_FP32", False):
        bundle.vae.to(dtype)
    if bundle.lora or bundle.train_motion_only:
        from diffusers.training_utils import cast_training_params
        bundle.unet.to(dtype)
        cast_training_params(bundle.unet, dtype=torch.float32)  # the parameters that require grad


def save_model(bundle: Bundle, path: str) -> None:
    """Write the bundle in diffusers' layout: unet/ (LoRA merged in), text_encoder/, tokenizer/,
    scheduler/, [vae/], model_index.json. ``build_model(bundle.family, path)`` loads it back."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    unet = bundle.unet
    if bundle.lora:  # a plain diffusers UNet that any pipeline loads: merge "default", drop adapters
        unet = copy.deepcopy(unet)
        unet.fuse_lora(adapter_names=["default"])
        unet.unload_lora()
    if _hook(bundle, "save"):  # transformer/, vae/, text_encoder/, tokenizer/, scheduler/ of the release
        return _hook(bundle, "save")(bundle, unet, root, diffusers.__version__)
    unet.save_pretrained(root / "unet")
    bundle.text_encoder.save_pretrained(root / "text_encoder")
    bundle.tokenizer.save_pretrained(root / "tokenizer")
    if bundle.family != "digits":
        sd15.write_tokenizer_files(root / "tokenizer")  # the files the SD-1.5 release has
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(bundle.scheduler_config, indent=2))
    index = {"_class_name": PIPELINE_CLASS.get(bundle.family, "SSPODigits"),  # digits: no diffusers pipeline
             "_diffusers_version": diffusers.__version__, "_sspo_family": bundle.family,
             "unet": ["diffusers", type(unet).__name__], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", bundle.scheduler_config.get("_class_name", "DDPMScheduler")],
             "feature_extractor": [None, None]}
    if bundle.vae is not None:
        bundle.vae.save_pretrained(root / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    if bundle.family == "animatediff":
        index.update(motion_adapter=[None, None], image_encoder=[None, None])
    elif bundle.family == "sdxl":
        bundle.text_encoder_2.save_pretrained(root / "text_encoder_2")
        bundle.tokenizer_2.save_pretrained(root / "tokenizer_2")
        sd15.write_tokenizer_files(root / "tokenizer_2")
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], image_encoder=[None, None],
                     force_zeros_for_empty_prompt=bundle.force_zeros_for_empty_prompt)
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def load_trainable(bundle: Bundle, weights: dict) -> None:
    """Copy saved trainable weights into the bundle's UNet in place (keys of trainable_state_dict)."""
    own = [n for n, _ in bundle.unet.named_parameters() if bundle.is_trainable(n)]
    missing = sorted(set(own) - set(weights))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[:3]}; "
                         f"was it written by a run with the same model and lora_rank?")
    params = dict(bundle.unet.named_parameters())
    for k in own:
        copy_full_(params[k], weights[k], name=k)  # exact shape and dtype; sharded (FSDP): each rank keeps its chunk


def vae_scale_factor(bundle: Bundle) -> int:
    """Pixels per latent along a side: 8 for SD-1.5's and SDXL's VAE, 1 without a VAE."""
    return 1 if bundle.vae is None else 2 ** (len(bundle.vae.config.block_out_channels) - 1)


def latent_shape(bundle: Bundle, resolution: int | tuple[int, int], num_frames: int = 0) -> tuple:
    """Shape of one x0 in diffusion space: (C,H,W), or (C,F,H,W) for video (F latent frames).
    ``resolution``: the side of a square in pixels, or (height, width) (cogvideox, wan)."""
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if _hook(bundle, "latent_shape"):
        return _hook(bundle, "latent_shape")(bundle, height, width, num_frames)
    if height != width:
        raise ValueError(f"model {bundle.family!r} trains square frames; got {height}x{width} (height x width)")
    if bundle.vae is None:
        s = bundle.unet.config.sample_size
        return (bundle.unet.config.in_channels, s, s)
    down = vae_scale_factor(bundle)
    if height % down:
        raise ValueError(f"resolution {height} must be a multiple of the VAE's factor {down}")
    c, s = bundle.unet.config.in_channels, height // down
    return (c, num_frames, s, s) if bundle.num_frames else (c, s, s)


# ----------------------------------------------------------------------------- conversions

def _tokens(tokenizer, prompts: list[str], device) -> torch.Tensor:
    """(B,77) ids as the pipelines tokenize: pad to model_max_length, truncate."""
    tok = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    return tok.input_ids.to(device)


@torch.no_grad()
def encode_prompts(bundle: Bundle, prompts: list[str], return_extra: bool = False):
    """Prompts (B strings; "" is the unconditional prompt for guidance) -> (B,77,D), tokenized
    exactly as the pipelines do. With ``return_extra``: ``(emb, extra)``, where ``extra`` holds
    the UNet's added conditioning known from text ({} except for SDXL).

    sd15/animatediff/digits: the last hidden state (StableDiffusionPipeline.encode_prompt).
    sdxl (StableDiffusionXLPipeline.encode_prompt, clip_skip None): the penultimate hidden states
    of text_encoder (B,77,768) and text_encoder_2 (B,77,1280), concatenated in that order
    -> (B,77,2048); extra = {"text_embeds": text_encoder_2's projected pooled output (B,1280)}.
    cogvideox / wan: their pipeline's T5 / UMT5 encoding, (B,226,D) / (B,512,D).
    Float32 whatever the encoders' dtype (``cast_frozen``), so that the sampler's latents, which
    follow it, are float32.
    """
    if _hook(bundle, "encode_prompts"):
        emb = _hook(bundle, "encode_prompts")(bundle, prompts).float()
        return (emb, {}) if return_extra else emb
    device = next(bundle.text_encoder.parameters()).device
    if bundle.text_encoder_2 is None:
        emb = bundle.text_encoder(_tokens(bundle.tokenizer, prompts, device))[0].float()  # (B,77,D)
        return (emb, {}) if return_extra else emb
    out1 = bundle.text_encoder(_tokens(bundle.tokenizer, prompts, device), output_hidden_states=True)
    out2 = bundle.text_encoder_2(_tokens(bundle.tokenizer_2, prompts, device), output_hidden_states=True)
    emb = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1).float()  # (B,77,D1+D2)
    return (emb, {"text_embeds": out2.text_embeds.float()}) if return_extra else emb  # text_embeds (B,P)


def add_time_ids(extra: dict, original_size, crop_top_left, target_size) -> dict:
    """SDXL's micro-conditioning: ``extra`` plus "time_ids" (B,6) = (original h, w, crop top,
    left, target h, w) per item, as StableDiffusionXLPipeline._get_add_time_ids (and SDXL's
    training) lay them out. ``original_size``/``crop_top_left``: (B,2) tensors or one (2,) pair
    for all; ``target_size``: (h, w). Families without "text_embeds" get ``extra`` unchanged."""
    if "text_embeds" not in extra:
        return extra
    ref = extra["text_embeds"]  # (B,P): the batch size, device and dtype to follow
    B = ref.shape[0]
    cols = [torch.as_tensor(v, dtype=ref.dtype, device=ref.device).reshape(-1, 2).expand(B, 2)
            for v in (original_size, crop_top_left, target_size)]
    return {**extra, "time_ids": torch.cat(cols, dim=1)}  # (B,6)


def image_conditions(bundle: Bundle, batch: dict, extra: dict) -> tuple[dict, dict]:
    """The UNet's added conditioning of winners and losers ({} but for SDXL). SDXL: time_ids
    from each data image's real original size and crop (data/__init__.py records them), as SDXL was
    trained; a replayed loser gets what sampling.sample conditioned it on: (R, R, 0, 0, R, R)."""
    if "text_embeds" not in extra:
        return extra, extra
    if "original_size" not in batch:
        raise ValueError(f"{bundle.family} needs each image's original_size and crop_top_left (image data)")
    target = tuple(batch["x0_w"].shape[-2:])  # (R, R)
    extra_w = add_time_ids(extra, batch["original_size"], batch["crop_top_left"], target)
    if "original_size_l" in batch:  # a data loser
        return extra_w, add_time_ids(extra, batch["original_size_l"], batch["crop_top_left_l"], target)
    return extra_w, add_time_ids(extra, target, (0, 0), target)


def cat_extra(*extras: dict) -> dict:
    """Concatenate added-conditioning dicts along the batch (as ``torch.cat`` of embeddings)."""
    return {k: torch.cat([e[k] for e in extras]) for k in extras[0]}


def _vae_context(bundle: Bundle):
    """SDXL's VAE overflows in fp16: its family runs it in float32 with autocast off."""
    if getattr(FAMILIES[bundle.family], "VAE_FP32", False):
        return torch.autocast(bundle.vae.device.type, enabled=False)
    return contextlib.nullcontext()


def _per_frame(x: torch.Tensor, fn, chunk: int) -> torch.Tensor:
    """Apply an image fn to a video (B,C,F,H,W) frame by frame, in chunks of frames."""
    B, _, F = x.shape[:3]
    frames = x.permute(0, 2, 1, 3, 4).reshape(B * F, *x.shape[1:2], *x.shape[3:])  # (B*F,C,H,W)
    out = torch.cat([fn(frames[i:i + chunk]) for i in range(0, B * F, chunk)])
    return out.reshape(B, F, *out.shape[1:]).permute(0, 2, 1, 3, 4)  # (B,C',F,H',W')


@torch.no_grad()
def encode_pixels(bundle: Bundle, x: torch.Tensor, generator: torch.Generator | list | None = None,
                  chunk: int = 16) -> torch.Tensor:
    """Pixels in [-1,1] -> diffusion-space x0. digits: identity (B,1,8,8). sd15: (B,3,H,W) ->
    (B,4,H/8,W/8) * scaling_factor, a sample of the VAE posterior. Video (B,3,F,H,W) -> (B,4,F,h,w).
    ``generator``: one for the batch, or a list of B (each item encoded alone with its own, so an
    item's latent does not depend on the rest of the batch)."""
    if bundle.vae is None:
        return x
    if isinstance(generator, list):
        if len(generator) != len(x):
            raise ValueError(f"{len(generator)} generators for a batch of {len(x)}")
        return torch.cat([encode_pixels(bundle, x[i:i + 1], g, chunk) for i, g in enumerate(generator)])
    if _hook(bundle, "encode_pixels"):  # 3D VAEs: (B,3,F,H,W) -> (B,C,F_lat,h,w), frames not independent
        return _hook(bundle, "encode_pixels")(bundle, x, generator)
    vae = bundle.vae
    x = x.to(device=vae.device, dtype=vae.dtype)
    fn = lambda im: vae.encode(im).latent_dist.sample(generator) * vae.config.scaling_factor  # noqa: E731
    with _vae_context(bundle):
        return _per_frame(x, fn, chunk) if x.ndim == 5 else fn(x)


@torch.no_grad()
def decode_latents(bundle: Bundle, z: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Inverse of ``encode_pixels`` (up to the VAE): latents -> pixels clamped to [-1,1]."""
    if bundle.vae is None:
        return z.clamp(-1, 1)
    if _hook(bundle, "decode_latents"):
        return _hook(bundle, "decode_latents")(bundle, z)
    vae = bundle.vae
    z = z.to(device=vae.device, dtype=vae.dtype)
    fn = lambda lat: vae.decode(lat / vae.config.scaling_factor).sample  # noqa: E731
    with _vae_context(bundle):
        return (_per_frame(z, fn, chunk) if z.ndim == 5 else fn(z)).clamp(-1, 1)


def unet_forward(bundle: Bundle, unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                 text_emb: torch.Tensor, extra: dict | None = None) -> torch.Tensor:
    """One UNet call. x_t (B,C,H,W) or video (B,C,F,H,W); t scalar or (B,); text_emb (B,77,D);
    extra: the UNet's ``added_cond_kwargs`` (SDXL: "text_embeds" (B,P), "time_ids" (B,6)).
    Returns the prediction (epsilon or v), same shape as x_t.

    diffusers 0.42's UNetMotionModel folds frames into the batch as (B*F) with each item's frames
    consecutive, and expects the caller to repeat the text embeddings the same way (as
    AnimateDiffPipeline does with repeat_interleave).

    cogvideox / wan: ``t`` is the scheduler's timestep (T * sigma for flows), x_t stays (B,C,F,H,W)
    here and the family's ``forward`` adapts it (CogVideoX: (B,F,C,H,W) and rotary embeddings).
    """
    if _hook(bundle, "forward"):
        return _hook(bundle, "forward")(bundle, unet, x_t, t, text_emb)
    if x_t.ndim == 5:
        text_emb = text_emb.repeat_interleave(x_t.shape[2], dim=0)  # (B,77,D) -> (B*F,77,D)
    if bundle.family == "sdxl" and not (extra and {"text_embeds", "time_ids"} <= set(extra)):
        raise ValueError("sdxl's UNet needs extra={'text_embeds', 'time_ids'} (models.encode_prompts"
                         "(..., return_extra=True), then models.add_time_ids)")
    if extra:
        return unet(x_t, t, encoder_hidden_states=text_emb, added_cond_kwargs=extra).sample
    return unet(x_t, t, encoder_hidden_states=text_emb).sample
