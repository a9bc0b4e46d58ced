"""Stable Diffusion XL (base 1.0) in diffusers' layout, from a local directory or the hub cache
(``local_files_only`` by default). Latents ``(B,4,H/8,W/8)``: 128x128 at 1024 px.

What differs from SD-1.5 (models/sd15.py), as StableDiffusionXLPipeline does it:
  * two text encoders, ``CLIPTextModel`` (ViT-L, 768) and ``CLIPTextModelWithProjection``
    (OpenCLIP bigG, 1280), each with its own tokenizer (the second pads with "!"); the UNet reads
    their penultimate hidden states concatenated, (B,77,768+1280) = (B,77,2048);
  * ``added_cond_kwargs``: ``text_embeds`` = the second encoder's projected pooled output (B,1280)
    and ``time_ids`` = (original h, w, crop top, left, target h, w) per image (B,6);
  * ``force_zeros_for_empty_prompt`` (model_index.json of the release): guidance's unconditional
    input is all zeros, not the encoding of "";
  * the VAE overflows in fp16: models/__init__.py always runs it in float32 (``VAE_FP32``), with autocast
    off, whatever ``mixed_precision`` says (the fp16-fix VAE, madebyollin/sdxl-vae-fp16-fix, can
    replace vae/ in the model directory; it runs in float32 here as well);
  * the release's scheduler is EulerDiscreteScheduler; the project's one sampler (models/sampling.py)
    reads the same DDPM settings into DDIM, as for SD-1.5.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from models.sd15 import write_tokenizer_files
from models.common import (Parts, clip_tokenizer, clip_vocab_and_merges, has_weights, resolve,
                             tiny_text_encoder)

REPO = "stabilityai/stable-diffusion-xl-base-1.0"
PATTERNS = ["model_index.json", "unet/*.json", "unet/diffusion_pytorch_model.safetensors",
            "vae/*.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/*.json",
            "text_encoder/model.safetensors", "text_encoder_2/*.json", "text_encoder_2/model.safetensors",
            "tokenizer/*", "tokenizer_2/*", "scheduler/*"]
VAE_FP32 = True  # models.encode_pixels / decode_latents run this family's VAE in float32, autocast off

# scheduler/scheduler_config.json of the release (EulerDiscreteScheduler, same DDPM betas as SD-1.5)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", interpolation_type="linear", sample_max_value=1.0,
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, timestep_spacing="leading",
                 use_karras_sigmas=False, clip_sample=False)

# unet/config.json of the release (what research/bench.py's memory plan instantiates on the meta device)
UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32)

SUBFOLDERS = [("unet", "config.json", "diffusion_pytorch_model"), ("vae", "config.json", "diffusion_pytorch_model"),
              ("text_encoder", "config.json", "model"), ("text_encoder_2", "config.json", "model"),
              ("tokenizer", "vocab.json", None), ("tokenizer_2", "vocab.json", None),
              ("scheduler", "scheduler_config.json", None)]


def layout_help(path: str, what: str) -> str:
    return (
        f"{what}\nExpected the diffusers layout of Stable Diffusion XL base 1.0:\n"
        f"  {path}/model_index.json\n"
        f"  {path}/unet/ and vae/            config.json + diffusion_pytorch_model.safetensors\n"
        f"  {path}/text_encoder/ and text_encoder_2/   config.json + model.safetensors\n"
        f"  {path}/tokenizer/ and tokenizer_2/         vocab.json, merges.txt, tokenizer_config.json\n"
        f"  {path}/scheduler/                scheduler_config.json\n"
        "To obtain it (needs a network connection, ~14 GB of fp32 safetensors), on a machine with access:\n"
        f"  huggingface-cli download {REPO} --local-dir {path} --include " + " ".join(f"'{p}'" for p in PATTERNS) + "\n"
        "or pass --local_files_only=false (train.py) to let diffusers fetch it into the hub cache. To try this code path "
        f"without weights: python -c \"from models import sdxl; sdxl.write_tiny('{path}')\"")


def check_layout(root: Path) -> None:
    """All problems at once, so that the user fixes the directory in one go."""
    missing = [] if (root / "model_index.json").is_file() else ["model_index.json"]
    for sub, cfg, stem in SUBFOLDERS:
        folder = root / sub
        if not folder.is_dir():
            missing.append(f"{sub}/")
        elif sub.startswith("tokenizer") and (folder / "tokenizer.json").is_file():
            continue  # transformers 5 writes a single tokenizer.json
        elif not (folder / cfg).is_file():
            missing.append(f"{sub}/{cfg}")
        elif stem and not has_weights(folder, stem):
            missing.append(f"{sub}/{stem}.safetensors")
    if missing:
        raise FileNotFoundError(layout_help(str(root), f"Incomplete Stable Diffusion XL directory '{root}': "
                                            f"missing {', '.join(missing)}."))


def load(path: str | None, local_files_only: bool = True, **_) -> Parts:
    """The parts of diffusers' SDXL layout (the release, a stand-in, or a saved run's final/)."""
    root = resolve(path, REPO, local_files_only, PATTERNS, layout_help)
    check_layout(root)
    try:
        kw = dict(local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **kw)
        tokenizer_2 = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2", **kw)
        scheduler_config = dict(EulerDiscreteScheduler.load_config(root, subfolder="scheduler"))
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(layout_help(str(root), f"Could not load '{root}' ({type(e).__name__}: {e}).")) from None
    if unet.config.addition_embed_type != "text_time":
        raise ValueError(layout_help(str(root), f"'{root}/unet' is not an SDXL UNet (addition_embed_type "
                                     f"{unet.config.addition_embed_type!r}, expected 'text_time')."))
    return Parts(unet, text_encoder, tokenizer, vae, scheduler_config, text_encoder_2=text_encoder_2,
                 tokenizer_2=tokenizer_2,
                 force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))


def tokenizer_2() -> CLIPTokenizer:
    """The second tokenizer of the release: CLIP's BPE, padded with "!" (id 0) instead of eos."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")


def write_tiny(path: str) -> str:
    """Random tiny SDXL stand-in in the real layout (StableDiffusionXLPipeline.from_pretrained loads it).

    UNet (32,64) channels, DownBlock2D then CrossAttnDownBlock2D (2 transformer layers), linear
    projections, "text_time" added embedding (time embed dim 8: 6*8 + 32 = 80 inputs); text
    encoders of hidden 32 each (cross-attention dim 64 = 32+32), the second with a 32-d
    projection; VAE with the release's 4 blocks (factor 8, 16-32 channels) -> latents at H/8 with
    SDXL's scaling factor 0.13025; the release's
    EulerDiscreteScheduler config and force_zeros_for_empty_prompt=True.
    """
    from diffusers import StableDiffusionXLPipeline
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16)
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            latent_channels=4, norm_num_groups=16, sample_size=64, scaling_factor=0.13025)
        text_encoder = tiny_text_encoder(32)
        text_encoder_2 = tiny_text_encoder(32, with_projection=True)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=tokenizer_2(), unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(path)
    root = Path(path)
    sched = root / "scheduler" / "scheduler_config.json"  # the release's file has DDIM/PNDM keys too
    sched.write_text(json.dumps(dict(json.loads(sched.read_text()), **SCHEDULER), indent=2))
    for sub in ("tokenizer", "tokenizer_2"):
        write_tokenizer_files(root / sub)
    return str(path)
