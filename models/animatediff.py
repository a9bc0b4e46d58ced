"""AnimateDiff: SD-1.5 plus a ``MotionAdapter`` merged with ``UNetMotionModel.from_unet2d``.
Latents ``(B,4,F,H/8,W/8)``. Trains the motion modules (or LoRA), as AnimateDiff does."""
from __future__ import annotations

import torch
from diffusers import MotionAdapter, UNetMotionModel

from models.sd15 import load as load_sd15
from models.common import Parts, has_weights, resolve

REPO = "guoyww/animatediff-motion-adapter-v1-5-3"


def load_motion_adapter(path: str | None, local_files_only: bool) -> MotionAdapter:
    help_ = (f"Expected a diffusers MotionAdapter directory (config.json + diffusion_pytorch_model.safetensors). "
             f"To obtain one: huggingface-cli download {REPO} --local-dir <dir>; to try the code "
             "path without weights: families.animatediff.write_tiny_motion_adapter(<dir>).")
    try:
        root = resolve(path, REPO, local_files_only, None, lambda p, why: why)
    except FileNotFoundError:
        raise FileNotFoundError(f"Motion adapter '{path or REPO}' not found. {help_}") from None
    if not (root / "config.json").is_file() or not has_weights(root, "diffusion_pytorch_model"):
        raise FileNotFoundError(f"Incomplete motion adapter directory '{root}'. {help_}")
    return MotionAdapter.from_pretrained(root, local_files_only=True)


def load(path: str | None, local_files_only: bool = True, motion_adapter_path: str | None = None, **_) -> Parts:
    """SD-1.5 parts with the UNet turned into a UNetMotionModel (unless ``path`` already holds one)."""
    parts = load_sd15(path, local_files_only)
    if not isinstance(parts.unet, UNetMotionModel):
        parts.unet = UNetMotionModel.from_unet2d(parts.unet, load_motion_adapter(motion_adapter_path, local_files_only))
    return parts


def write_tiny_motion_adapter(path: str) -> str:
    """Random tiny ``MotionAdapter`` matching ``sd15.write_tiny``'s UNet (2 blocks, 1 layer each),
    no motion mid block (as v1-5-3)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=16,
                                motion_num_attention_heads=2, motion_max_seq_length=32, use_motion_mid_block=False)
    adapter.save_pretrained(path)
    return str(path)
