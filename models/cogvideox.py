"""CogVideoX (THUDM/CogVideoX-2b, -5b): ``CogVideoXTransformer3DModel``, ``AutoencoderKLCogVideoX``,
a T5 encoder, and ``CogVideoXDDIMScheduler`` (v-prediction, zero terminal SNR, SNR shift 3,
trailing spacing), loaded with diffusers' and transformers' own classes as ``CogVideoXPipeline`` does.

Layout convention: the project's video x0 is (B,C,F,H,W) everywhere (data, losses, sampler);
the transformer takes (B,F,C,H,W), so :func:`forward` permutes on the way in and out. F is the
latent frame count (num_frames - 1) / 4 + 1, H, W = pixels / 8. Text: T5 hidden states (B,226,D).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from models.common import Parts, check_dirs, resolve, save_pipeline_dir, tiny_t5_tokenizer

REPO = "THUDM/CogVideoX-2b"
SUBDIRS = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
           "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
PATTERNS = ["model_index.json"] + [f"{d}/*" for d in SUBDIRS]
# CogVideoX-2b's scheduler/scheduler_config.json. CogVideoX-5b's is the same except
# snr_shift_scale 1.0 (SCHEDULER_5B); a real model's own file is what the loader reads.
SCHEDULER = dict(_class_name="CogVideoXDDIMScheduler", num_train_timesteps=1000, beta_start=0.00085,
                 beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
                 rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing",
                 set_alpha_to_one=True, steps_offset=0, clip_sample=False)
SCHEDULER_5B = dict(SCHEDULER, snr_shift_scale=1.0)


def layout_help(path: str, what: str) -> str:
    dirs = "".join(f"  {path}/{d}/\n" for d in SUBDIRS)
    return (f"{what}\nExpected the diffusers layout of CogVideoX:\n  {path}/model_index.json\n{dirs}"
            f"To obtain it: huggingface-cli download {REPO} --local-dir {path} (or THUDM/CogVideoX-5b); "
            f"to try the code path without weights: python -c \"from models import cogvideox; "
            f"cogvideox.write_tiny('{path}')\"")


def load(path: str | None, local_files_only: bool = True, **_) -> Parts:
    root = resolve(path, REPO, local_files_only, PATTERNS, layout_help)
    check_dirs(root, SUBDIRS, layout_help)
    try:
        transformer = CogVideoXTransformer3DModel.from_pretrained(root, subfolder="transformer", local_files_only=True)
        vae = AutoencoderKLCogVideoX.from_pretrained(root, subfolder="vae", local_files_only=True)
        text_encoder = T5EncoderModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True)
        tokenizer = T5Tokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
        scheduler_config = dict(CogVideoXDDIMScheduler.load_config(root, subfolder="scheduler"))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(layout_help(str(root), f"Could not load '{root}' ({type(e).__name__}: {e}).")) from None
    return Parts(transformer, text_encoder, tokenizer, vae, scheduler_config)


def make_scheduler(scheduler_config: dict) -> CogVideoXDDIMScheduler:
    """The sampler CogVideoXPipeline runs with the release's config (DDIM, eta 0, trailing)."""
    return CogVideoXDDIMScheduler.from_config(scheduler_config)


# ----------------------------------------------------------------------------- conversions

def _spatial_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for the release


def latent_shape(bundle, height: int, width: int, num_frames: int) -> tuple:
    """(C, F_lat, H/8, W/8) with F_lat = (num_frames - 1) / 4 + 1 (the VAE keeps the first frame).
    H and W must be multiples of the VAE's spatial factor (8: 2^(len(block_out_channels) - 1))
    times the transformer's patch_size (2), i.e. 16 for the releases (native 480x720)."""
    tc, s = int(bundle.vae.config.temporal_compression_ratio), _spatial_factor(bundle.vae)
    p = bundle.unet.config.patch_size
    if (num_frames - 1) % tc:
        raise ValueError(f"cogvideox: num_frames must be {tc}k+1 (e.g. 49 for the release), got {num_frames}")
    if height % (s * p) or width % (s * p):
        raise ValueError(f"cogvideox: height and width must be multiples of {s * p} (the VAE's spatial factor {s} "
                         f"x the transformer's patch_size {p}), got {height}x{width} (height x width)")
    if bundle.unet.config.patch_size_t is not None:
        raise ValueError("cogvideox: CogVideoX 1.5 (patch_size_t) is not supported; use CogVideoX-2b / -5b")
    return (bundle.unet.config.in_channels, (num_frames - 1) // tc + 1, height // s, width // s)


@torch.no_grad()
def encode_prompts(bundle, prompts: list[str]) -> torch.Tensor:
    """T5 last hidden states (B, 226, D), tokenized as CogVideoXPipeline (pad to 226, truncate, </s>)."""
    n = bundle.unet.config.max_text_seq_length
    ids = bundle.tokenizer(list(prompts), padding="max_length", max_length=n, truncation=True,
                           add_special_tokens=True, return_tensors="pt").input_ids
    return bundle.text_encoder(ids.to(bundle.text_encoder.device))[0]


@torch.no_grad()
def encode_pixels(bundle, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,3,F,H,W) in [-1,1] -> (B,C,F_lat,H/8,W/8) = a VAE posterior sample * scaling_factor."""
    vae = bundle.vae
    z = vae.encode(x.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample(generator)
    return z * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(bundle, z: torch.Tensor) -> torch.Tensor:
    vae = bundle.vae
    return vae.decode(z.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1)


def rotary_embedding(config, frames: int, height: int, width: int, device) -> tuple | None:
    """(cos, sin) over the latent token grid, as CogVideoXPipeline._prepare_rotary_positional_embeddings
    (CogVideoX 1.0: the grid is placed in the base size's resize-crop region); None if unused."""
    if not config.use_rotary_positional_embeddings:
        return None
    p = config.patch_size
    grid = (height // p, width // p)
    crops = get_resize_crop_region_for_grid(grid, config.sample_width // p, config.sample_height // p)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=grid,
                                   temporal_size=frames, device=device)


def forward(bundle, net, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """x_t (B,C,F,H,W) -> v prediction (B,C,F,H,W); t: the scheduler's timestep, scalar or (B,)."""
    B, _, F, H, W = x_t.shape
    rope = rotary_embedding(bundle.unet.config, F, H, W, x_t.device)
    t = torch.as_tensor(t, device=x_t.device).expand(B)
    out = net(hidden_states=x_t.permute(0, 2, 1, 3, 4), encoder_hidden_states=text_emb.to(x_t.dtype),
              timestep=t, image_rotary_emb=rope, return_dict=False)[0]  # (B,F,C,H,W)
    return out.permute(0, 2, 1, 3, 4)


# ----------------------------------------------------------------------------- save / stand-in

def save(bundle, transformer, root: Path, diffusers_version: str) -> None:
    """The release's layout; CogVideoXPipeline.from_pretrained loads it."""
    save_pipeline_dir(Path(root), "CogVideoXPipeline", {
        "transformer": (transformer, "diffusers", "CogVideoXTransformer3DModel"),
        "vae": (bundle.vae, "diffusers", "AutoencoderKLCogVideoX"),
        "text_encoder": (bundle.text_encoder, "transformers", "T5EncoderModel"),
        "tokenizer": (bundle.tokenizer, "transformers", "T5Tokenizer")},
        bundle.scheduler_config, diffusers_version, "cogvideox")


def write_tiny(path: str) -> str:
    """Random tiny CogVideoX in the release's layout (CogVideoXPipeline.from_pretrained loads it):
    the -5b configs with width and depth cut (2 layers, 2 heads of 16, T5 d_model 32, VAE
    channels 8), 16 latent channels, rotary embeddings on and -5b's scheduler config
    (SCHEDULER_5B: snr_shift_scale 1.0), 226 text tokens. Use 32 px, 9 frames: latents (16, 3, 4, 4)."""
    import diffusers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=32,
            text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True)
        vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=16, layers_per_block=1,
                                     norm_num_groups=2, temporal_compression_ratio=4, sample_height=32,
                                     sample_width=32)
        tokenizer = tiny_t5_tokenizer()
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8))
    parts = Parts(transformer, text_encoder, tokenizer, vae, dict(SCHEDULER_5B))
    save(parts, transformer, Path(path), diffusers.__version__)
    return str(path)
