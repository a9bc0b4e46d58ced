"""Memory plan for SDXL (per GPU, DDP), computed from the real configurations, no weights loaded.

    python -m research.memory_sdxl            # -> results/memory_sdxl.md

Parameter counts come from instantiating the release's UNet config (models/sdxl.UNET_CONFIG),
its VAE and both text encoders on the meta device (``with torch.device("meta")``: shapes, no
storage). LoRA counts are r * (in + out) over the modules peft targets (models' LORA_TARGETS).
Bytes per parameter: fp32 weights 4, gradients 4 (+4 for DDP's gradient buckets), AdamW 8
(exp_avg, exp_avg_sq). The reference (replay.py) is a frozen fp32 copy of the UNet with full
fine-tuning and a second adapter "ref" with LoRA. Replay snapshots hold the trainable weights:
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
    snapshots = cfg.max_steps // config_mod.replay_interval(cfg) + 1  # + checkpoint 0, the initial model
    rows = []
    for mode, T, ref in [("full fine-tuning", P, P)] + [(f"LoRA r={r}", lora_count(unet, r), lora_count(unet, r))
                                                         for r in lora_ranks]:
        gpu = {"UNet weights (fp32)": 4 * P, "LoRA adapter (fp32)": 4 * T if T != P else 0,
               "gradients (fp32)": 4 * T, "DDP gradient buckets": 4 * T, "AdamW exp_avg + exp_avg_sq": 8 * T,
               "reference (replay.py)": 4 * ref, "text encoders + VAE (fp32)": 4 * sum(frozen.values())}
        rows.append(dict(mode=mode, trainable=T, gpu=gpu, gpu_total=sum(gpu.values()),
                         snapshot_fp32=4 * T, snapshot_bf16=2 * T, pool_fp32=4 * T * snapshots))
    return dict(unet=P, frozen=frozen, snapshots=snapshots, rows=rows, cfg=cfg)


def markdown(p: dict) -> str:
    cfg = p["cfg"]
    L = ["# SDXL memory plan (per GPU, DDP; computed by research/memory_sdxl.py from the release's configs)", "",
         f"UNet {p['unet'] / 1e6:.1f}M parameters; frozen: "
         + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in p["frozen"].items()) + ".",
         f"Preset configs/sdxl_pickapic.py: {cfg.resolution} px (latents {cfg.resolution // 8}x{cfg.resolution // 8}), "
         f"max_steps {cfg.max_steps}, replay every {config_mod.replay_interval(cfg)} -> {p['snapshots']} replay snapshots "
         f"(pool_storage={cfg.pool_storage}).", "",
         "GB = 1e9 bytes. Activations excluded (measure on a GPU: research/bench.py); bf16 autocast keeps fp32 master weights.", "",
         "| mode | trainable | UNet | adapter | grads | DDP buckets | AdamW | reference | text enc. + VAE | **GPU before activations** | snapshot fp32 / bf16 | pool of all snapshots, fp32 (host RAM or disk) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        g = r["gpu"]
        cells = [r["mode"], f"{r['trainable'] / 1e6:.1f}M"] + [f"{v / GB:.2f}" for v in g.values()]
        cells += [f"**{r['gpu_total'] / GB:.1f}**", f"{r['snapshot_fp32'] / GB:.2f} / {r['snapshot_bf16'] / GB:.2f}",
                  f"{r['pool_fp32'] / GB:.1f}"]
        L.append("| " + " | ".join(cells) + " |")
    full = p["rows"][0]["gpu_total"] / GB
    L += ["", f"Full fine-tuning: {full:.0f} GB of states per GPU leaves about {80 - full:.0f} GB of an 80 GB GPU "
          "for activations at 1024 px (batch 1, gradient checkpointing on, bf16 autocast). memory_bf16 halves the "
          "pool; disk keeps it off host RAM. With LoRA the frozen fp32 UNet dominates."]
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
