"""The embedded default's model: pixel space (no VAE), 1 channel, 8x8, a ~1M-parameter
``UNet2DConditionModel``, a small ``CLIPTextModel`` and the real CLIP BPE tokenizer built offline.
The base model is built by digits.py; this file only defines the architecture and loads it."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from models.common import SD15_SCHEDULER, Parts, clip_tokenizer, tiny_text_encoder

SEED = 0  # a fresh model is always the same model


def _unet() -> UNet2DConditionModel:
    # 8x8 -> 4x4 -> 2x2
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 48, 48), norm_num_groups=8, attention_head_dim=4,
        # cross-attention at 4x4 and in the mid block only: at 8x8 it cost half of a CPU step
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        # The prompt also enters globally: an attention-pooled text vector is added to the time
        # embedding that every ResNet block reads.
        addition_embed_type="text", encoder_hid_dim=64, addition_embed_type_num_heads=4)


def fresh() -> Parts:
    """Seeded random init that leaves the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = _unet()
        # CLIP's own init scale: the text encoder learns to read while the base is built (digits.py).
        text_encoder = tiny_text_encoder(64)
    return Parts(unet, text_encoder, clip_tokenizer(), None, dict(SD15_SCHEDULER, _class_name="DDPMScheduler"))


def load(path: str | None, local_files_only: bool = True, **_) -> Parts:
    """``path`` None: a fresh seeded init; else a directory written by models.save_model."""
    if path is None:
        return fresh()
    root = Path(path)
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"Digits model directory '{root}' lacks {sub}/ (expected unet/, "
                                    "text_encoder/, tokenizer/, scheduler/ as written by models.save_model).")
    return Parts(UNet2DConditionModel.from_pretrained(root, subfolder="unet"),
                 CLIPTextModel.from_pretrained(root, subfolder="text_encoder"),
                 CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"), None,
                 dict(DDPMScheduler.load_config(root, subfolder="scheduler")))
