"""Wan2.1 text-to-video (Wan-AI/Wan2.1-T2V-1.3B-Diffusers): ``WanTransformer3DModel``,
``AutoencoderKLWan``, a UMT5 encoder, and a flow-matching scheduler (the release ships
``UniPCMultistepScheduler`` with flow sigmas and ``flow_shift`` 3.0; ``FlowMatchEulerDiscreteScheduler``
with ``shift`` works too), loaded with diffusers' and transformers' own classes as ``WanPipeline`` does.

Layout: x0 (B,C,F,H,W) as the project's convention and the transformer's own; C = 16,
F = (num_frames - 1) / 4 + 1, H, W = pixels / 8. Latents are normalised per channel with the
VAE's ``latents_mean`` / ``latents_std`` (as WanPipeline undoes before decoding). Text: UMT5 hidden
states (B,512,D) with the padding positions zeroed, as WanPipeline. The network's timestep is
1000 * sigma (noise.py); its output is the velocity eps - x0 (flow.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
import diffusers
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from models.common import Parts, check_dirs, resolve, save_pipeline_dir, tiny_t5_tokenizer

# The VAE is kept and run in float32 under mixed precision (models.cast_frozen; encode/decode with
# autocast off), as diffusers' Wan documentation loads AutoencoderKLWan with torch_dtype=float32.
VAE_FP32 = True

REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
SUBDIRS = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
           "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
PATTERNS = ["model_index.json"] + [f"{d}/*" for d in SUBDIRS]
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default
# The release's scheduler/scheduler_config.json (the settings that matter here).
SCHEDULER = dict(_class_name="UniPCMultistepScheduler", num_train_timesteps=1000, prediction_type="flow_prediction",
                 use_flow_sigmas=True, flow_shift=3.0, solver_order=2, solver_type="bh2", predict_x0=True,
                 lower_order_final=True, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
SAMPLERS = {"UniPCMultistepScheduler": UniPCMultistepScheduler,
            "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler}


def layout_help(path: str, what: str) -> str:
    dirs = "".join(f"  {path}/{d}/\n" for d in SUBDIRS)
    return (f"{what}\nExpected the diffusers layout of Wan2.1:\n  {path}/model_index.json\n{dirs}"
            f"To obtain it: huggingface-cli download {REPO} --local-dir {path}; to try the code path "
            f"without weights: python -c \"from models import wan; wan.write_tiny('{path}')\"")


def load(path: str | None, local_files_only: bool = True, **_) -> Parts:
    root = resolve(path, REPO, local_files_only, PATTERNS, layout_help)
    check_dirs(root, SUBDIRS, layout_help)
    try:
        transformer = WanTransformer3DModel.from_pretrained(root, subfolder="transformer", local_files_only=True)
        vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", local_files_only=True)
        text_encoder = UMT5EncoderModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True)
        tokenizer = T5Tokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
        scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(root, subfolder="scheduler"))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(layout_help(str(root), f"Could not load '{root}' ({type(e).__name__}: {e}).")) from None
    make_scheduler(scheduler_config)  # an unsupported sampler fails here, not at the first loser
    return Parts(transformer, text_encoder, tokenizer, vae, scheduler_config)


def make_scheduler(scheduler_config: dict):
    """The scheduler class the config names (UniPC with flow sigmas, or flow-matching Euler)."""
    cls = SAMPLERS.get(scheduler_config.get("_class_name"))
    if cls is None:
        raise ValueError(f"wan: scheduler {scheduler_config.get('_class_name')!r} not supported; "
                         f"expected one of {tuple(SAMPLERS)}")
    return cls.from_config(scheduler_config)


# ----------------------------------------------------------------------------- conversions

def latent_shape(bundle, height: int, width: int, num_frames: int) -> tuple:
    """(C, F_lat, H/8, W/8) with F_lat = (num_frames - 1) / 4 + 1. H and W must be multiples of the
    VAE's scale_factor_spatial (8) times the transformer's patch_size (1, 2, 2) along each side,
    i.e. 16 for the release (native 480x832; WanPipeline asks the same)."""
    vae, p = bundle.vae.config, bundle.unet.config.patch_size  # p = (t, h, w)
    tc, s = vae.scale_factor_temporal, vae.scale_factor_spatial
    if (num_frames - 1) % tc:
        raise ValueError(f"wan: num_frames must be {tc}k+1 (e.g. 81 for the release), got {num_frames}")
    mh, mw = s * p[1], s * p[2]
    if height % mh or width % mw:
        mult = mh if mh == mw else f"{mh} (height) and {mw} (width)"
        raise ValueError(f"wan: height and width must be multiples of {mult} (the VAE's scale_factor_spatial "
                         f"{s} x the transformer's patch_size {tuple(p[1:])}), got {height}x{width} (height x width)")
    return (bundle.unet.config.in_channels, (num_frames - 1) // tc + 1, height // s, width // s)


@torch.no_grad()
def encode_prompts(bundle, prompts: list[str]) -> torch.Tensor:
    """UMT5 last hidden states (B,512,D), zero past each prompt's length, as WanPipeline."""
    tok = bundle.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                           truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    dev = bundle.text_encoder.device
    mask = tok.attention_mask.to(dev)
    emb = bundle.text_encoder(tok.input_ids.to(dev), mask).last_hidden_state
    return emb * mask[..., None].to(emb.dtype)  # right padding: equal to WanPipeline's trim-and-zero-pad


def _stats(vae, like: torch.Tensor):
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


@torch.no_grad()
def encode_pixels(bundle, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,3,F,H,W) in [-1,1] -> normalised latents (z - mean) / std, (B,16,F_lat,H/8,W/8)."""
    vae = bundle.vae
    with torch.autocast(vae.device.type, enabled=False):  # VAE_FP32
        z = vae.encode(x.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample(generator)
    mean, std = _stats(vae, z)
    return (z - mean) / std


@torch.no_grad()
def decode_latents(bundle, z: torch.Tensor) -> torch.Tensor:
    vae = bundle.vae
    z = z.to(device=vae.device, dtype=vae.dtype)
    mean, std = _stats(vae, z)
    with torch.autocast(vae.device.type, enabled=False):  # VAE_FP32
        return vae.decode(z * std + mean).sample.clamp(-1, 1)


def forward(bundle, net, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """x_t (B,C,F,H,W) -> velocity (B,C,F,H,W); t = 1000 * sigma, scalar or (B,)."""
    t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
    return net(hidden_states=x_t, timestep=t, encoder_hidden_states=text_emb.to(x_t.dtype), return_dict=False)[0]


# ----------------------------------------------------------------------------- save / stand-in

def save(bundle, transformer, root: Path, diffusers_version: str) -> None:
    """The release's layout; WanPipeline.from_pretrained loads it."""
    save_pipeline_dir(Path(root), "WanPipeline", {
        "transformer": (transformer, "diffusers", "WanTransformer3DModel"),
        "vae": (bundle.vae, "diffusers", "AutoencoderKLWan"),
        "text_encoder": (bundle.text_encoder, "transformers", "UMT5EncoderModel"),
        "tokenizer": (bundle.tokenizer, "transformers", "T5Tokenizer")},
        bundle.scheduler_config, diffusers_version, "wan")


def write_tiny(path: str, scheduler: str = "UniPCMultistepScheduler") -> str:
    """Random tiny Wan2.1 in the release's layout (WanPipeline.from_pretrained loads it): the
    1.3B config with width and depth cut (2 layers, 2 heads of 12, ffn 32, UMT5 d_model 32, VAE
    base_dim 8 with the release's 16 latent channels and their mean/std), the release's UniPC
    flow config (or ``scheduler="FlowMatchEulerDiscreteScheduler"``, shift 3). The release's geometry
    is kept: VAE factor 8 (4 temporal), patch (1, 2, 2), rope table of 1024 positions, so the
    preset's native 480x832 runs too. Tests use 32 px, 9 frames: latents (16, 3, 4, 4)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)  # the release's: native 480x832 = 30x52 patches
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        tokenizer = tiny_t5_tokenizer()
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64,
                                                   num_layers=2, num_heads=4, relative_attention_num_buckets=8))
    sched = dict(SCHEDULER) if scheduler == "UniPCMultistepScheduler" else dict(
        _class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0)
    save(Parts(transformer, text_encoder, tokenizer, vae, sched), transformer, Path(path), diffusers.__version__)
    return str(path)
