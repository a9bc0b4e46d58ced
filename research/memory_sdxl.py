"""Memory plan for SDXL (per GPU, DDP), computed from the real configurations, no weights loaded.

    python -m research.memory_sdxl            # -> results/memory_sdxl.md

Parameter counts come from instantiating the release's UNet config (models/sdxl.UNET_CONFIG),
its VAE and both text encoders on the meta device (``with torch.device("meta")``: shapes, no
storage). LoRA counts are r * (in + out) over the modules peft targets (models' LORA_TARGETS).
Bytes per parameter: trained fp32 weights 4, gradients 4 (+4 for DDP's gradient buckets), AdamW 8
(exp_avg, exp_avg_sq). Frozen modules are held in the autocast dtype of the preset's
mixed_precision (bf16: 2 B; ``models.cast_frozen``, as diffusers' scripts hold them in
weight_dtype): the text encoders, LoRA's base UNet, and the reference (replay.py: a frozen copy
of the UNet with full fine-tuning, a second adapter "ref" with LoRA); the VAE stays fp32 (4 B),
as diffusers' SDXL scripts keep it. The last column adds up the GPU memory with every frozen
module in fp32 (no cast), for comparison. Replay snapshots hold the trainable weights:
off the GPU (host RAM for memory / memory_bf16, files for disk), one per K = ``replay_every`` updates
plus the initial model. Activations are not in the table: they depend on attention kernels and
checkpointing and must be measured on a GPU (research/bench.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import config as config_mod
from models import sdxl
from models.common import LORA_TARGETS

ROOT = Path(__file__).resolve().parents[1]  # the repository
GB = 1e9

# text_encoder/config.json (CLIP ViT-L/14) and text_encoder_2/config.json (OpenCLIP bigG/14) of the release
TEXT_1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
           block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_count(unet: torch.nn.Module, rank: int) -> int:
    """Parameters of a rank-r LoRA on every Linear whose name ends in a LORA_TARGETS entry."""
    return sum(rank * (m.in_features + m.out_features) for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in LORA_TARGETS))


def plan(cfg: config_mod.Config, lora_ranks=(8, 64)) -> dict:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl.UNET_CONFIG)
        frozen = {"text_encoder (CLIP-L)": count(CLIPTextModel(CLIPTextConfig(**TEXT_1))),
                  "text_encoder_2 (bigG)": count(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2))),
                  "vae (fp32, always)": count(AutoencoderKL(**VAE))}
    P = count(unet)
    fb = 2 if cfg.mixed_precision in ("bf16", "fp16") else 4  # bytes per frozen parameter
    text = frozen["text_encoder (CLIP-L)"] + frozen["text_encoder_2 (bigG)"]
    vae = frozen["vae (fp32, always)"]
    snapshots = cfg.max_steps // config_mod.replay_interval(cfg) + 1  # + checkpoint 0, the initial model
    rows = []
    for mode, T, ref in [("full fine-tuning", P, P)] + [(f"LoRA r={r}", lora_count(unet, r), lora_count(unet, r))
                                                         for r in lora_ranks]:
        full = T == P
        gpu = {"UNet weights": 4 * P if full else fb * P, "LoRA adapter (fp32)": 0 if full else 4 * T,
               "gradients (fp32)": 4 * T, "DDP gradient buckets": 4 * T, "AdamW exp_avg + exp_avg_sq": 8 * T,
               "reference (replay.py)": fb * ref, "text encoders + VAE": fb * text + 4 * vae}
        before = sum(gpu.values()) + (4 - fb) * ((0 if full else P) + ref + text)  # frozen modules in fp32
        rows.append(dict(mode=mode, trainable=T, gpu=gpu, gpu_total=sum(gpu.values()), gpu_fp32_frozen=before,
                         snapshot_fp32=4 * T, snapshot_bf16=2 * T, pool_fp32=4 * T * snapshots))
    return dict(unet=P, frozen=frozen, snapshots=snapshots, rows=rows, cfg=cfg, frozen_bytes=fb)


def markdown(p: dict) -> str:
    cfg, fb = p["cfg"], p["frozen_bytes"]
    dtype = {2: cfg.mixed_precision, 4: "fp32"}[fb]
    L = ["# SDXL memory plan (per GPU, DDP; written by `python -m research.memory_sdxl` from the release's configs)", "",
         f"UNet {p['unet'] / 1e6:.1f}M parameters; frozen: "
         + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in p["frozen"].items()) + ".",
         f"Preset configs/sdxl_pickapic.py: {cfg.resolution} px (latents {cfg.resolution // 8}x{cfg.resolution // 8}), "
         f"max_steps {cfg.max_steps}, replay every {config_mod.replay_interval(cfg)} -> {p['snapshots']} replay snapshots "
         f"(pool_storage={cfg.pool_storage}), mixed_precision={cfg.mixed_precision}.", "",
         f"GB = 1e9 bytes. Activations excluded (measure on a GPU: research/bench.py). Trained weights are fp32 (master "
         f"weights under autocast); frozen modules are held in {dtype} (the reference, the text encoders, LoRA's base UNet), "
         f"the VAE in fp32.", "",
         f"| mode | trainable | UNet ({dtype} where frozen) | adapter | grads | DDP buckets | AdamW | reference ({dtype}) "
         f"| text enc. ({dtype}) + VAE (fp32) | **GPU before activations** | same, frozen modules fp32 | snapshot fp32 / bf16 "
         f"| pool of all snapshots, fp32 (host RAM or disk) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        g = r["gpu"]
        cells = [r["mode"], f"{r['trainable'] / 1e6:.1f}M"] + [f"{v / GB:.2f}" for v in g.values()]
        cells += [f"**{r['gpu_total'] / GB:.1f}**", f"{r['gpu_fp32_frozen'] / GB:.1f}",
                  f"{r['snapshot_fp32'] / GB:.2f} / {r['snapshot_bf16'] / GB:.2f}", f"{r['pool_fp32'] / GB:.1f}"]
        L.append("| " + " | ".join(cells) + " |")
    full = p["rows"][0]["gpu_total"] / GB
    L += ["", f"Full fine-tuning: {full:.0f} GB of states per GPU leaves about {80 - full:.0f} GB of an 80 GB GPU "
          "for activations at 1024 px (batch 1, gradient checkpointing on, bf16 autocast). memory_bf16 halves the "
          f"pool; disk keeps it off host RAM. With LoRA the frozen UNet ({dtype}) dominates."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "memory_sdxl.md"))
    args = ap.parse_args(argv)
    cfg = config_mod.resolve({"config": "sdxl_pickapic", "data_path": "unused"})
    text = markdown(plan(cfg))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
