"""Memory plan for CogVideoX-2B / -5B and Wan2.1-1.3B training on 80 GB GPUs, from the releases'
transformer, text encoder (T5-XXL / UMT5-XXL encoder) and VAE configs built on the meta device
(shapes only, no weights). Writes results/memory_video.md.

Per GPU, no sharding, bf16 mixed precision (the presets'): the trained weights are fp32 with
AdamW as this loop runs it (fp32 params 4 + grads 4 + Adam m, v 8 = 16 B/param, bf16 autocast);
the frozen modules (text encoder, VAE, the reference copy of a full fine-tune, LoRA's base
transformer and its "ref" adapter) are held in bf16, 2 B/param (``models.cast_frozen``,
``replay.Reference``, as diffusers' scripts hold them in weight_dtype), except a VAE_FP32
family's VAE (Wan's), kept in float32; the "fp32" columns show every frozen module in float32
(4 B/param), for comparison. Replay pool: one snapshot of the trainable
weights per checkpoint (fp32 in memory). Activations are a rough estimate: tokens x hidden x
layers x bytes/token/layer (~34 x 2 B without checkpointing, 2 B with it, per sample, for 2
samples (winner + loser) of the video in the preset).
    python -m research.memory_video
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan, CogVideoXTransformer3DModel, WanTransformer3DModel
from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from models import cogvideox, wan

# transformer/config.json of the releases (the fields that set the shapes).
MODELS = {
    "CogVideoX-2B": (CogVideoXTransformer3DModel, dict(num_attention_heads=30, attention_head_dim=64, in_channels=16,
                     out_channels=16, time_embed_dim=512, text_embed_dim=4096, num_layers=30, sample_width=90,
                     sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226), 13, 60, 90, 226),
    "CogVideoX-5B": (CogVideoXTransformer3DModel, dict(num_attention_heads=48, attention_head_dim=64, in_channels=16,
                     out_channels=16, time_embed_dim=512, text_embed_dim=4096, num_layers=42, sample_width=90,
                     sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226,
                     use_rotary_positional_embeddings=True), 13, 60, 90, 226),
    "Wan2.1-1.3B": (WanTransformer3DModel, dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                    in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads"), 21, 60, 104, 512),
}
# text_encoder/config.json of the releases: T5 v1.1 XXL encoder (CogVideoX), UMT5-XXL encoder (Wan2.1);
# their VAEs are diffusers' default configs of AutoencoderKLCogVideoX / AutoencoderKLWan.
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
FROZEN = {"CogVideoX": (lambda: T5EncoderModel(T5Config(vocab_size=32128, **T5_XXL)), AutoencoderKLCogVideoX),
          "Wan2.1": (lambda: UMT5EncoderModel(UMT5Config(vocab_size=256384, **T5_XXL)), AutoencoderKLWan)}
VAE_IN_FP32 = {"CogVideoX": getattr(cogvideox, "VAE_FP32", False), "Wan2.1": getattr(wan, "VAE_FP32", False)}
GB = 1e9


def lora_params(model, rank: int) -> int:
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0"):
            n += rank * (m.in_features + m.out_features)
    return n


def plan(rank: int = 128, snapshots: int = 10) -> str:
    rows = ["| model | params | text encoder + VAE | full FT: trained states (16 B/p) | full FT: frozen (reference, text "
            "encoder, VAE) fp32 / **bf16** | LoRA r%d params | LoRA: frozen (base, text encoder, VAE) fp32 / **bf16** "
            "| activations 2 samples (ckpt / none) | replay pool %d snapshots (LoRA / full, fp32) | full FT fits 80 GB "
            "unsharded? (bf16 frozen) |" % (rank, snapshots),
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, (cls, cfg, f, h, w, text) in MODELS.items():
        text_encoder, vae = FROZEN[name.split("-")[0]]
        with torch.device("meta"):
            model = cls(**cfg)
            n_vae = sum(p.numel() for p in vae().parameters())
            te = sum(p.numel() for p in text_encoder().parameters()) + n_vae
        vae_fp32 = n_vae if VAE_IN_FP32[name.split("-")[0]] else 0  # 2 more bytes each in the bf16 columns
        n = sum(p.numel() for p in model.parameters())
        hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        tokens = f * (h // 2) * (w // 2) + (text if cls is CogVideoXTransformer3DModel else 0)
        act = lambda per: 2 * tokens * hidden * cfg["num_layers"] * per / GB  # noqa: E731
        nl = lora_params(model, rank)
        frozen_full, frozen_lora = n + te, n + te + nl  # LoRA: the base transformer and the "ref" adapter
        half = lambda k: (k * 2 + vae_fp32 * 2) / GB  # noqa: E731  (bf16, a VAE_FP32 VAE at 4 B)
        full = n * 16 / GB + half(frozen_full)
        rows.append(f"| {name} | {n / 1e9:.2f} B | {te / 1e9:.2f} B | {n * 16 / GB:.1f} GB "
                    f"| {frozen_full * 4 / GB:.1f} / **{half(frozen_full):.1f}** GB | {nl / 1e6:.1f} M "
                    f"| {frozen_lora * 4 / GB:.1f} / **{half(frozen_lora):.1f}** GB "
                    f"| {act(2):.1f} / {act(68):.0f} GB | {snapshots * nl * 4 / GB:.2f} / {snapshots * n * 4 / GB:.0f} GB (host RAM or disk) "
                    f"| {'yes' if full + act(2) < 80 else 'no: shard (FSDP) or LoRA'} ({full + act(2):.0f} GB) |")
    return "\n".join(rows)


if __name__ == "__main__":
    text = ("# Memory plan: video models (written by `python -m research.memory_video` from the release configs on the "
            "meta device)\n\n"
            "Latents of the presets: CogVideoX 49 frames 480x720 -> 13x60x90; Wan2.1 81 frames 480x832 -> 21x60x104. "
            "Activations are rough (per-layer bytes per token x hidden); measure on a GPU before relying on them. "
            "Frozen modules are held in bf16 under the presets' bf16 mixed precision, Wan's VAE in fp32 (the fp32 columns: "
            "every frozen module in fp32, for comparison); "
            "the full fine-tune's total is trained states + bf16 frozen modules + activations with checkpointing.\n\n"
            + plan() + "\n")
    Path("results").mkdir(exist_ok=True)
    Path("results/memory_video.md").write_text(text)
    print(text)
