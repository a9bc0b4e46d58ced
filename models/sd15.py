"""Stable Diffusion 1.5 in diffusers' layout, from a local directory or the hub cache
(``local_files_only`` by default). Latents ``(B,4,H/8,W/8)``. Real layout: a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel, UNetMotionModel
from transformers import CLIPTextModel, CLIPTokenizer

from models.common import (SD15_SCHEDULER, Parts, clip_tokenizer, clip_vocab_and_merges, has_weights,
                             resolve, tiny_text_encoder)

REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PATTERNS = ["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"]


def layout_help(path: str, what: str) -> str:
    return (
        f"{what}\nExpected the diffusers layout of Stable Diffusion 1.5:\n"
        f"  {path}/model_index.json\n"
        f"  {path}/unet/          config.json + diffusion_pytorch_model.safetensors\n"
        f"  {path}/vae/           config.json + diffusion_pytorch_model.safetensors\n"
        f"  {path}/text_encoder/  config.json + model.safetensors\n"
        f"  {path}/tokenizer/     vocab.json, merges.txt, tokenizer_config.json\n"
        f"  {path}/scheduler/     scheduler_config.json\n"
        "To obtain it (needs a network connection, ~5 GB), on a machine with access:\n"
        f"  huggingface-cli download {REPO} --local-dir {path} --include model_index.json "
        "'unet/*' 'vae/*' 'text_encoder/*' 'tokenizer/*' 'scheduler/*'\n"
        "or pass --local_files_only=false (train.py) to let diffusers fetch it into the hub cache. To try this code path "
        f"without weights: python -c \"from models import sd15; sd15.write_tiny('{path}')\"")


def check_layout(root: Path) -> None:
    """All problems at once, so that the user fixes the directory in one go."""
    missing = []
    if not (root / "model_index.json").is_file():
        missing.append("model_index.json")
    for sub, cfg, stem in [("unet", "config.json", "diffusion_pytorch_model"),
                           ("vae", "config.json", "diffusion_pytorch_model"),
                           ("text_encoder", "config.json", "model"),
                           ("tokenizer", "vocab.json", None), ("scheduler", "scheduler_config.json", None)]:
        folder = root / sub
        if not folder.is_dir():
            missing.append(f"{sub}/")
        elif sub == "tokenizer" and (folder / "tokenizer.json").is_file():
            continue  # transformers 5 saves a single tokenizer.json; the release has vocab.json + merges.txt
        elif not (folder / cfg).is_file():
            missing.append(f"{sub}/{cfg}")
        elif stem and not has_weights(folder, stem):
            missing.append(f"{sub}/{stem}.safetensors")
    if missing:
        raise FileNotFoundError(layout_help(str(root), f"Incomplete Stable Diffusion 1.5 directory '{root}': "
                                            f"missing {', '.join(missing)}."))


def load(path: str | None, local_files_only: bool = True, **_) -> Parts:
    """The parts of diffusers' SD-1.5 layout (a saved AnimateDiff run's motion UNet too)."""
    root = resolve(path, REPO, local_files_only, PATTERNS, layout_help)
    check_layout(root)
    try:
        unet_cls = json.loads((root / "unet" / "config.json").read_text()).get("_class_name")
        unet_cls = UNetMotionModel if unet_cls == "UNetMotionModel" else UNet2DConditionModel  # saved animatediff
        unet = unet_cls.from_pretrained(root, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
        scheduler_config = dict(PNDMScheduler.load_config(root, subfolder="scheduler"))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(layout_help(str(root), f"Could not load '{root}' ({type(e).__name__}: {e}).")) from None
    return Parts(unet, text_encoder, tokenizer, vae, scheduler_config)


def write_tokenizer_files(folder: Path) -> None:
    """The release's tokenizer/ holds vocab.json, merges.txt, special_tokens_map.json and
    tokenizer_config.json (transformers 5 writes tokenizer.json + tokenizer_config.json only)."""
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    token = lambda t: {"content": t, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}  # noqa: E731
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": token("<|startoftext|>"), "eos_token": token("<|endoftext|>"),
         "pad_token": "<|endoftext|>", "unk_token": token("<|endoftext|>")}, indent=2))


def write_tiny(path: str) -> str:
    """Random tiny SD-1.5 stand-in in the real layout (StableDiffusionPipeline.from_pretrained loads it).

    UNet (32,64) channels with cross-attention dim 32; VAE with the release's 4 blocks, so its
    factor 8 (3 downsamplings) -> latent 4 channels at H/8, but 16-32 channels; text encoder
    hidden 32 with the real CLIP tokenizer; a PNDM scheduler config as in the release.
    """
    from diffusers import StableDiffusionPipeline
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16)
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            latent_channels=4, norm_num_groups=16, sample_size=64)
        text_encoder = tiny_text_encoder(32)
    scheduler = PNDMScheduler(**{k: v for k, v in SD15_SCHEDULER.items() if k not in ("clip_sample",)},
                              skip_prk_steps=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    sched = Path(path) / "scheduler" / "scheduler_config.json"  # the release's file also says clip_sample false
    sched.write_text(json.dumps(dict(json.loads(sched.read_text()), clip_sample=False), indent=2))
    write_tokenizer_files(Path(path) / "tokenizer")
    return str(path)
