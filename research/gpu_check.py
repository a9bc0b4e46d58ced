"""One prepared GPU check: the real-scale numbers a user of the paper asks for first, within a
time budget, on one GPU.

    python -m research.gpu_check                # one GPU, 480 s budget -> results/gpu.md, results/gpu.json
    python -m research.gpu_check --dry-run      # the same code path at tiny widths on the CPU, seconds
    python -m research.gpu_check --dry-run --device cuda   # the tiny widths on the GPU (a smoke test)
    python -m research.gpu_check --plan-only    # the tables, every measured cell "not measured yet"

Rows, in the order they run (the most wanted first, so that a short budget still yields them):

1. SD-1.5 at its real shapes: the UNet built from the release's config (research/bench_harness.py's
   ``SD15_UNET``) with random weights (weights change neither speed nor memory), 64x64 latents
   (512 px), bf16 autocast, gradient checkpointing, full fine-tuning and per-GPU batch 1 as
   configs/sd15_pickapic.py sets them. SFT, Diffusion-DPO, and SSPO with loser sampling at the
   preset's settings (UniPC, 6 steps, guidance 7.5, ``loser_every`` 2, ``loser_batch`` 16), each
   timed as ``loop.update`` itself (the median of several updates after a warm-up) with peak
   memory ``torch.cuda.max_memory_allocated`` over the row (weights, reference, AdamW state,
   activations). One update is ``loser_batch`` / ``batch_size`` = 16 micro-steps of batch 1 (the
   preset's 128 micro-steps are 8 such groups); an SSPO update is one cycle of ``loser_every``
   updates divided by ``loser_every``, the cycle beginning with a fresh reference load from the
   disk pool (Random Checkpoint Replay's worst case: a new checkpoint every cycle) and one
   sampling call for the 16 pairs. Ratios SSPO / Diffusion-DPO against the paper's Table 4 (A100:
   x1.54 memory, x1.95 time) and the project's target (a full SSPO update within 1.8x DPO's).
2. The loser-sampling sweep: one sampling call alone (the drawn checkpoint as denoiser, UniPC
   with guidance) at 6 / 10 / 20 steps for 16 pairs and at 1 / 4 / 16 pairs for 6 steps, per pair,
   and the SSPO / DPO ratio each setting predicts: the measured SSPO update with its sampling
   cost replaced by that setting's (per update: 16 pairs' sampling / ``loser_every``).
3. Peak memory of one LoRA update (Diffusion-DPO's: policy and reference forwards on winner and
   loser, the backward, AdamW) of SDXL at 1024 px (128x128 latents, rank 8), CogVideoX-2B at 49
   frames 480x720 (13x60x90 latents, rank 128) and Wan2.1-1.3B at 81 frames 480x832 (21x60x104,
   rank 32), the presets' native sizes, bf16 autocast and gradient checkpointing, against the
   memory plans (research/memory_sdxl.py, research/memory_video.py). Text encoders are small
   random stand-ins with the real output width and there is no VAE: the batch is latents, and the
   plans' comparable figure leaves out what is not loaded. The frozen weights (LoRA's base, the
   text encoders) are held in the autocast dtype and the trained ones in float32, as
   ``loop.setup`` holds them (``models.cast_frozen``).

Every row fails soft: an out-of-memory error writes "OOM", a missing package "needs <name>", any
other error its type and message, and the rest still run. The budget (``--budget``, 480 s) is
checked before each row (a row starts only with its minimum time left) and between timed
updates (a row stops with the updates it has, at least one); both files are rewritten after
every row, so a run cut off from outside still leaves what it measured. At module import this
file loads only torch, diffusers, transformers, peft, safetensors and the project's own modules.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import config
import loop
import models
import noise
import replay
from infra import runtime
from models import common, sampling

ROOT = Path(__file__).resolve().parents[1]  # the repository
GB, MB = 1e9, 2**20
# SSPO paper, Table 4 (SD-1.5, one A100): peak memory (MB) and seconds per step.
PAPER = {"dpo": {"memory_mb": 11206, "s_per_step": 1.36}, "sspo": {"memory_mb": 17284, "s_per_step": 2.65}}
TARGET_TIME_RATIO = 1.8  # a full SSPO update within 1.8x a Diffusion-DPO update
DEFAULT_BUDGET_S = 480.0
SWEEP = [(6, 1), (6, 4), (6, 16), (10, 16), (20, 16)]  # (loser steps, pairs per sampling call)
TINY_SWEEP = {6: 2, 10: 3, 20: 4, 1: 1, 4: 2, 16: 4}  # --dry-run's steps and pairs for those of SWEEP
FAMILY_ROWS = [("sdxl", "sdxl_pickapic", 8), ("cogvideox", "cogvideox_sdpo", None), ("wan", "wan21_sdpo", None)]
LABEL = {"sd15/sft": "SFT", "sd15/dpo": "Diffusion-DPO", "sd15/sspo": "SSPO, losers sampled at the preset's settings",
         "sdxl": "SDXL base 1.0", "cogvideox": "CogVideoX-2B", "wan": "Wan2.1-T2V-1.3B"}
NOT_YET = "not measured yet"
# The tiny widths of --dry-run (and of the CUDA tests): the real layouts with every width cut.
TINY = {
    "sd15": dict(block_out_channels=(32, 32, 32, 32), cross_attention_dim=32, norm_num_groups=8),
    "sdxl": dict(block_out_channels=(32, 32, 64), transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 2, 4),
                 cross_attention_dim=96, addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8),
    "cogvideox": dict(num_attention_heads=2, attention_head_dim=16, time_embed_dim=32, text_embed_dim=32, num_layers=2,
                      sample_width=4, sample_height=4, sample_frames=9),
    "wan": dict(num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2,
                rope_max_seq_len=32),
}


# ----------------------------------------------------------------------------- models at real or tiny width

def preset(name: str, **changes) -> config.Config:
    """The resolved settings of configs/<name>.py (no data is read), with ``changes``."""
    return dataclasses.replace(config.resolve({"config": name, "data_path": "unused"}), **changes)


def native_shape(family: str, cfg: config.Config, tiny: bool) -> tuple:
    """One x0 in diffusion space at the preset's native size: (4,R/8,R/8) for images,
    (16,(F-1)/4+1,H/8,W/8) for the video transformers; 8x8 latents (3 latent frames) when tiny."""
    if family in ("sd15", "sdxl"):
        side = 8 if tiny else cfg.resolution // 8
        return (4, side, side)
    frames = 9 if tiny else cfg.num_frames
    h, w = (32, 32) if tiny else config.frame_size(cfg)
    return (16, (frames - 1) // 4 + 1, h // 8, w // 8)


def build(family: str, cfg: config.Config, device: torch.device, tiny: bool = False,
          lora_rank: int | None = None) -> tuple[models.Bundle, tuple]:
    """A ``models.Bundle`` of ``family`` with random weights, set up as ``models.build_model`` sets
    up a loaded one (frozen, LoRA "default" of ``lora_rank`` (default: the preset's) or full
    fine-tuning, gradient checkpointing as ``cfg`` says), and its x0 shape. The denoiser is the
    release's configuration (``tiny``: widths and depths cut, same layout), built on ``device``
    directly; the text encoders are 2-layer random stand-ins with the real output width, and
    there is no VAE (the batch is latents)."""
    from diffusers import UNet2DConditionModel
    from research.bench_harness import SD15_UNET
    rank = cfg.lora_rank if lora_rank is None else lora_rank
    small = TINY[family] if tiny else {}
    extra = {}
    torch.manual_seed(0)
    if family in ("sd15", "sdxl"):
        from models import sdxl
        ucfg = dict(SD15_UNET if family == "sd15" else sdxl.UNET_CONFIG, **small)
        with torch.device(device):
            net = UNet2DConditionModel(**ucfg)
        tokenizer = common.clip_tokenizer()
        if family == "sd15":
            text = common.tiny_text_encoder(ucfg["cross_attention_dim"])
            scheduler_config = dict(common.SD15_SCHEDULER)
        else:  # CLIP-L and bigG widths, concatenated to cross_attention_dim; bigG's pooled projection
            d2 = ucfg["projection_class_embeddings_input_dim"] - 6 * ucfg["addition_time_embed_dim"]
            text = common.tiny_text_encoder(ucfg["cross_attention_dim"] - d2)
            extra = dict(text_encoder_2=common.tiny_text_encoder(d2, with_projection=True).to(device),
                         tokenizer_2=common.clip_tokenizer(), force_zeros_for_empty_prompt=True)
            scheduler_config = dict(sdxl.SCHEDULER)
    else:
        from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
        from research.memory_video import MODELS
        cls, tcfg = MODELS["CogVideoX-2B" if family == "cogvideox" else "Wan2.1-1.3B"][:2]
        tcfg = dict(tcfg, **small)
        with torch.device(device):
            net = cls(**tcfg)
        tokenizer = common.tiny_t5_tokenizer()
        width = tcfg["text_embed_dim" if family == "cogvideox" else "text_dim"]
        t5 = dict(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                  relative_attention_num_buckets=8)
        text = T5EncoderModel(T5Config(**t5)) if family == "cogvideox" else UMT5EncoderModel(UMT5Config(**t5))
        scheduler_config = dict(getattr(__import__(f"models.{family}", fromlist=["SCHEDULER"]), "SCHEDULER"))
    net.requires_grad_(False)
    if rank > 0:
        net.add_adapter(models.lora_config(rank), adapter_name="default")
    bundle = models.Bundle(family=family, unet=net, text_encoder=text.to(device).requires_grad_(False).eval(),
                           tokenizer=tokenizer, vae=None, scheduler_config=scheduler_config, lora=rank > 0,
                           num_frames=(9 if tiny else cfg.num_frames) if family in ("cogvideox", "wan") else 0,
                           **extra)
    if bundle.text_encoder_2 is not None:
        bundle.text_encoder_2.requires_grad_(False).eval()
    for p in bundle.trainable_parameters():
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    net.train()
    return bundle, native_shape(family, cfg, tiny)


class Rig:
    """One model trained by one method through ``loop.update``, as train.py runs it on one GPU
    (no DDP): the fields of a ``loop.Run`` that ``update`` and ``training_step`` read, built as
    ``loop.setup`` builds them (a replay pool holding checkpoint 0 for the SSPO family), and a stream that hands out
    the same batch (``cfg.batch_size`` pairs of random latents) on every call."""

    def __init__(self, bundle: models.Bundle, shape: tuple, method: str, cfg: config.Config,
                 device: torch.device, directory: str):
        m = config.METHODS[method]
        cfg = dataclasses.replace(cfg, method=method)
        self.cfg, self.device, self.shape, self.step = cfg, device, shape, 0
        models.cast_frozen(bundle, runtime.autocast_dtype(cfg))  # as loop.setup
        reference = replay.Reference(bundle, runtime.autocast_dtype(cfg)) if m.losers != "none" else None
        pool = None
        if m.losers == "replayed":  # as loop.setup: DPO-style methods keep no pool
            pool = replay.CheckpointPool("uniform", seed=cfg.seed, storage=cfg.pool_storage, directory=directory)
            pool.add(bundle.trainable_state_dict(), 0)
        params = bundle.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=cfg.weight_decay)
        autocast = runtime.autocast(cfg, device)
        self.run = SimpleNamespace(
            cfg=cfg, ctx=runtime.Dist(device=device), out=Path(directory), bundle=bundle, policy=bundle.unet,
            reference=reference, pool=pool, opt=opt, lr_sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
            scaler=torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16"), autocast=autocast,
            noise=noise.Process.from_config(bundle.scheduler_config, device), shape=shape, method=m,
            params=params, losers=None)
        B = cfg.batch_size
        g = torch.Generator().manual_seed(0)
        self.batch = {"prompt": [f"a photo of object number {i}" for i in range(B)],
                      "x0_w": torch.randn(B, *shape, generator=g), "x0_l": torch.randn(B, *shape, generator=g),
                      "index": torch.arange(B)}
        if bundle.family == "sdxl":  # each image's size and crop (data/ records them): here the target's
            self.batch.update(original_size=torch.tensor([list(shape[-2:])] * B), crop_top_left=torch.zeros(B, 2))
        self.stream = iter(lambda: dict(self.batch), None)

    def new_losers(self) -> None:
        """A fresh ``replay.Losers``, as ``loop.setup`` builds it: its first ``begin`` loads the
        drawn checkpoint into the reference again (a new checkpoint every cycle)."""
        run, cfg = self.run, self.cfg
        run.losers = replay.Losers(
            pool=run.pool, reference=run.reference, replayed=run.method.losers == "replayed", every=cfg.loser_every,
            group=max(1, cfg.loser_batch // cfg.batch_size), grad_accum=cfg.grad_accum,
            sample=dict(num_inference_steps=cfg.loser_steps, guidance_scale=cfg.loser_guidance,
                        scheduler=cfg.loser_scheduler),
            seed=cfg.seed, shape=self.shape, process=run.noise, device=self.device, autocast=run.autocast)

    def cycle(self) -> int:
        """One loser cycle through ``loop.update``: ``loser_every`` updates with replayed losers
        (the first loads a checkpoint, always anew, and samples the losers; the rest retrain on
        them), one update otherwise. Returns the number of updates."""
        if self.run.losers is None or self.run.method.losers == "replayed":
            self.new_losers()  # a fixed reference (Diffusion-DPO) is loaded once, as in training
        k = self.run.losers.every
        for _ in range(k):
            if loop.update(self.run, self.stream, self.step, SimpleNamespace(requested=False)) is None:
                raise RuntimeError("loop.update stopped early")
            self.step += 1
        return k


# ----------------------------------------------------------------------------- budget, timing, rows

class Budget:
    """The run's wall-clock allowance, counted from construction."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def used(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.used()


def _sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, repeats: int, cap_s: float, budget: Budget, log=print) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; stops early,
    with at least one timed call, once the row has run ``cap_s`` or the budget is spent."""
    start, out = time.perf_counter(), []
    for i in range(warmup + repeats):
        if i > warmup and (time.perf_counter() - start > cap_s or budget.left() < 0):
            log(f"    stopped after {len(out)} timed calls (row cap {cap_s:.0f} s or budget)")
            break
        _sync(device)
        t0 = time.perf_counter()
        n = fn() or 1
        _sync(device)
        dt = (time.perf_counter() - t0) / n
        if i >= warmup:
            out.append(dt)
        log(f"    {'warm-up' if i < warmup else 'timed'} {dt:.3f} s")
    return out


def summary(seconds: list[float]) -> dict:
    """Median (and min / max) of timed calls."""
    return {"s_median": statistics.median(seconds), "s_min": min(seconds), "s_max": max(seconds), "n": len(seconds)}


def _free(device: torch.device) -> None:
    """Drop what the last row left and start the peak-memory count afresh."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> dict:
    """Peak device memory since the row began (CUDA's allocator; none on the CPU)."""
    if device.type != "cuda":
        return {"peak_mb": None}
    return {"peak_mb": torch.cuda.max_memory_allocated(device) / MB,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / MB}


def fail_status(e: BaseException) -> str:
    """A failed row's status: "OOM", "needs <package>", or the error's type and message."""
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "OOM"
    if isinstance(e, ImportError):
        name = getattr(e, "name", None) or str(e).split("'")[1 if "'" in str(e) else 0]
        return f"needs {name}"
    return f"error: {type(e).__name__}: {' '.join(str(e).split())[:200]}"


def attempt(rows: dict, key: str, fn, budget: Budget, need_s: float, device: torch.device, log=print) -> None:
    """Run one row and record it in ``rows[key]``, failing soft; skipped when less than
    ``need_s`` of the budget is left."""
    if budget.left() < need_s:
        rows[key] = {"status": "skipped: time budget"}
        log(f"[{key}] skipped: {budget.left():.0f} s left, needs {need_s:.0f}")
        return
    _free(device)
    t0 = time.perf_counter()
    log(f"[{key}] start ({budget.left():.0f} s of budget left)")
    try:
        row = dict(fn(), status="ok")
    except Exception as e:  # every row fails soft, whatever failed
        row = {"status": fail_status(e)}
        log(f"[{key}] {row['status']}")
    row["wall_s"] = time.perf_counter() - t0
    rows[key] = row
    _free(device)


# ----------------------------------------------------------------------------- the rows

def sd15_settings(tiny: bool) -> config.Config:
    """configs/sd15_pickapic.py, with one update = loser_batch / batch_size micro-steps (the
    preset's 128 are 8 such groups); tiny: 2 micro-steps, 2 pairs per sampling call, 2 steps."""
    cfg = preset("sd15_pickapic")
    accum = min(cfg.grad_accum, max(1, cfg.loser_batch // cfg.batch_size))
    return dataclasses.replace(cfg, grad_accum=2, loser_batch=2, loser_steps=2) if tiny else \
        dataclasses.replace(cfg, grad_accum=accum)


def sd15_row(method: str, cfg: config.Config, device: torch.device, tiny: bool, budget: Budget, reps: dict, log=print):
    """Seconds per update and peak memory of ``method`` on SD-1.5 (see the module's docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle, shape = build("sd15", cfg, device, tiny)
        rig = Rig(bundle, shape, method, cfg, device, tmp)
        secs = timed(rig.cycle, device, reps["warmup"], reps["repeats"], reps["cap_s"], budget,
                     log=lambda s: log(f"[sd15/{method}]{s}"))
        out = dict(summary(secs), **peak(device), micro_steps=cfg.grad_accum, pairs_per_update=cfg.grad_accum * cfg.batch_size,
                   attention=sorted({type(a).__name__ for a in bundle.unet.attn_processors.values()}))
        out["s_per_pair"] = out["s_median"] / out["pairs_per_update"]
        return out


def sweep_rows(cfg: config.Config, device: torch.device, tiny: bool, budget: Budget, reps: dict, log=print) -> dict:
    """Loser sampling alone at each (steps, pairs) of ``SWEEP`` (``TINY_SWEEP``'s when tiny), with the
    reference network (the drawn checkpoint) as denoiser, under the run's autocast; each
    setting fails soft on its own."""
    bundle, shape = build("sd15", cfg, device, tiny)
    models.cast_frozen(bundle, runtime.autocast_dtype(cfg))  # as loop.setup
    reference = replay.Reference(bundle, runtime.autocast_dtype(cfg))
    autocast = runtime.autocast(cfg, device)
    res = {}
    for steps, pairs in SWEEP:
        key = f"steps{steps}_pairs{pairs}"  # the nominal setting; tiny runs TINY_SWEEP's
        n, steps = (TINY_SWEEP[pairs], TINY_SWEEP[steps]) if tiny else (pairs, steps)
        if budget.left() < reps["need_s"]:
            res[key] = {"status": "skipped: time budget"}
            continue
        z = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1)).to(device)
        prompts = [f"a photo of object number {i}" for i in range(n)]

        def call():
            with autocast():
                sampling.sample(bundle, reference, prompts, latents=z, latent_shape=shape, num_inference_steps=steps,
                                guidance_scale=cfg.loser_guidance, scheduler=cfg.loser_scheduler)
        try:
            secs = timed(call, device, reps["warmup"], reps["repeats"], reps["cap_s"], budget,
                         log=lambda s, key=key: log(f"[sweep/{key}]{s}"))
            res[key] = dict(summary(secs), status="ok", steps=steps, pairs=n, s_per_pair=statistics.median(secs) / n)
        except Exception as e:
            res[key] = {"status": fail_status(e), "steps": steps, "pairs": n}
        gc.collect()
    return {"settings": res}


def family_row(family: str, preset_name: str, rank: int | None, device: torch.device, tiny: bool, budget: Budget,
               reps: dict, log=print) -> dict:
    """Peak memory (and seconds) of LoRA updates of Diffusion-DPO on ``family`` at its preset's
    native size, bf16 autocast and gradient checkpointing, one micro-step of batch 1."""
    cfg = preset(preset_name, method="dpo", grad_accum=1, batch_size=1, pool_storage="memory",
                 mixed_precision="bf16", gradient_checkpointing=True,
                 **({"lora_rank": rank} if rank else {}))
    with tempfile.TemporaryDirectory() as tmp:
        bundle, shape = build(family, cfg, device, tiny)
        rig = Rig(bundle, shape, "dpo", cfg, device, tmp)
        n = reps["family_updates"]
        secs = timed(rig.cycle, device, min(1, n - 1), n - min(1, n - 1), reps["cap_s"], budget,
                     log=lambda s: log(f"[{family}]{s}"))
        return dict(summary(secs), **peak(device), lora_rank=cfg.lora_rank, latents=list(shape),
                    trainable_m=sum(p.numel() for p in bundle.trainable_parameters()) / 1e6)


# ----------------------------------------------------------------------------- the memory plans

def plans() -> dict:
    """Per family row: the memory plan's GB per GPU, and the part of it this check loads (the
    plans count text encoders, VAE and DDP buckets that a one-GPU latent-space update has not)."""
    from research import memory_sdxl, memory_video
    out = {}
    with contextlib.suppress(Exception):
        p = memory_sdxl.plan(preset("sdxl_pickapic"), lora_ranks=(8,))["rows"][1]
        g = p["gpu"]
        out["sdxl"] = {"source": "research/memory_sdxl.py, LoRA r=8, before activations", "total_gb": p["gpu_total"] / GB,
                       "comparable_gb": (p["gpu_total"] - g["text encoders + VAE"] - g["DDP gradient buckets"]) / GB,
                       "activations_gb": None}
    for family, name, preset_name in (("cogvideox", "CogVideoX-2B", "cogvideox_sdpo"), ("wan", "Wan2.1-1.3B", "wan21_sdpo")):
        with contextlib.suppress(Exception):
            cls, tcfg, f, h, w, text = memory_video.MODELS[name]
            rank = preset(preset_name).lora_rank
            with torch.device("meta"):
                net = cls(**tcfg)
            n = sum(p.numel() for p in net.parameters())
            nl = memory_video.lora_params(net, rank)
            tokens = f * (h // 2) * (w // 2) + (text if family == "cogvideox" else 0)
            act = 2 * tokens * tcfg["num_attention_heads"] * tcfg["attention_head_dim"] * tcfg["num_layers"] * 2 / GB
            states = (2 * n + 16 * nl + 2 * nl) / GB  # bf16 frozen base, LoRA + grads + AdamW, the bf16 "ref" adapter
            out[family] = {"source": f"research/memory_video.py formulas, LoRA r={rank}, activations checkpointed",
                           "total_gb": states + act, "comparable_gb": states + act, "activations_gb": act}
    return out


# ----------------------------------------------------------------------------- report

def _f(v, fmt: str) -> str:
    """A number formatted, or a dash where there is none."""
    return "—" if v is None else format(v, fmt)


def ratios(rows: dict) -> dict:
    """SSPO / Diffusion-DPO, memory and time, where both rows were measured."""
    d, s = rows.get("sd15/dpo", {}), rows.get("sd15/sspo", {})
    out = {"paper_memory": PAPER["sspo"]["memory_mb"] / PAPER["dpo"]["memory_mb"],
           "paper_time": PAPER["sspo"]["s_per_step"] / PAPER["dpo"]["s_per_step"], "target_time": TARGET_TIME_RATIO,
           "memory": None, "time": None}
    if d.get("status") == "ok" and s.get("status") == "ok":
        if d.get("peak_mb") and s.get("peak_mb"):
            out["memory"] = s["peak_mb"] / d["peak_mb"]
        out["time"] = s["s_median"] / d["s_median"]
    return out


def predicted(rows: dict, cfg: config.Config) -> dict:
    """Per sweep setting, the SSPO / DPO ratio with the measured SSPO update's sampling cost
    replaced by that setting's: sspo + (per_pair(setting) - per_pair(preset)) x pairs / every."""
    sw = rows.get("sweep", {}).get("settings", {})
    d, s = rows.get("sd15/dpo", {}), rows.get("sd15/sspo", {})
    base = next((v for v in sw.values() if (v.get("steps"), v.get("pairs")) == (cfg.loser_steps, cfg.loser_batch)), {})
    if not (d.get("status") == s.get("status") == base.get("status") == "ok"):
        return {}
    pairs = s["pairs_per_update"]
    return {k: (s["s_median"] + (v["s_per_pair"] - base["s_per_pair"]) * pairs / cfg.loser_every) / d["s_median"]
            for k, v in sw.items() if v.get("status") == "ok"}


def markdown(res: dict) -> str:
    """results/gpu.md from the results: every cell of a row not measured shows the row's status."""
    m, rows, cfg = res["machine"], res["rows"], SimpleNamespace(**res["sd15_settings"])
    st = lambda r: r.get("status", NOT_YET)  # noqa: E731
    ok = lambda r: st(r) == "ok"  # noqa: E731
    stamp = (f"Written by `{res['command']}` (research/gpu_check.py): the plans only; every measured cell waits "
             "for `python -m research.gpu_check` on a GPU." if m["device"].startswith("none") else
             f"Written by `{res['command']}` (research/gpu_check.py) on **{m.get('gpu', m['device'])}**; torch "
             f"{m['torch']} (CUDA {m.get('cuda') or 'none'}), diffusers {m['diffusers']}, transformers "
             f"{m['transformers']}, peft {m['peft']}; {res.get('tiny') and 'tiny widths (dry run), ' or ''}"
             f"budget {res['budget_s']:.0f} s, used {res.get('used_s', 0):.0f} s.")
    L = ["# GPU check: SD-1.5 speed and memory at real shapes, loser-sampling sweep, SDXL / CogVideoX / Wan memory",
         "", stamp, "",
         f"## SD-1.5 ({'dry run: the real layout at tiny widths, 8x8 latents' if res.get('tiny') else 'real UNet config'}, "
         f"random weights, {cfg.resolution} px = {cfg.resolution // 8}x{cfg.resolution // 8} latents at full size, bf16 autocast, gradient checkpointing, {'full fine-tuning' if not cfg.lora_rank else f'LoRA r={cfg.lora_rank}'}, "
         f"batch {cfg.batch_size}, {cfg.grad_accum} micro-steps per update)", "",
         "Each time is `loop.update`, median of the timed updates after warm-up; SSPO's includes its share of "
         f"the cycle's reference load (disk pool) and loser sampling ({cfg.loser_scheduler}, {cfg.loser_steps} steps, "
         f"guidance {cfg.loser_guidance}, every {cfg.loser_every} updates, {cfg.loser_batch} pairs per call). "
         "Peak = `torch.cuda.max_memory_allocated` over the row.", "",
         "| method | s per update (median) | min / max, n | s per pair | peak memory (MB) | status |",
         "|---|---|---|---|---|---|"]
    for key in ("sd15/sft", "sd15/dpo", "sd15/sspo"):
        r = rows.get(key, {})
        if ok(r):
            L.append(f"| {LABEL[key]} | {r['s_median']:.3f} | {r['s_min']:.3f} / {r['s_max']:.3f}, {r['n']} | "
                     f"{r['s_per_pair']:.4f} | {_f(r.get('peak_mb'), ',.0f')} | ok |")
        else:
            L.append(f"| {LABEL[key]} | — | | | | {st(r)} |")
    q = ratios(rows)
    met = "—" if q["time"] is None else ("met" if q["time"] <= TARGET_TIME_RATIO else "missed")
    L += ["", "| SSPO / Diffusion-DPO | measured | paper Table 4 (A100: 17,284 / 11,206 MB; 2.65 / 1.36 s) | target |",
          "|---|---|---|---|",
          f"| peak memory | {_f(q['memory'], '.2f') if q['memory'] else NOT_YET if not ok(rows.get('sd15/sspo', {})) else '—'} "
          f"| {q['paper_memory']:.2f} | — |",
          f"| time per update | {_f(q['time'], '.2f') if q['time'] else NOT_YET} | {q['paper_time']:.2f} "
          f"| <= {TARGET_TIME_RATIO} ({met}) |", "",
          "## Loser-sampling sweep (SD-1.5, one sampling call, the reference as denoiser, guidance "
          f"{cfg.loser_guidance}, {cfg.loser_scheduler})", "",
          "Predicted SSPO / DPO: the measured SSPO update with its sampling replaced by the setting's "
          f"({cfg.grad_accum * cfg.batch_size} pairs per update, sampled every {cfg.loser_every} updates).", "",
          "| steps | pairs per call | s per call | s per pair | per-pair speed-up vs 1 pair | predicted SSPO / DPO | status |",
          "|---|---|---|---|---|---|---|"]
    sw = rows.get("sweep", {})
    pred = predicted(rows, cfg)
    for steps, pairs in SWEEP:
        key = f"steps{steps}_pairs{pairs}"
        r = sw.get("settings", {}).get(key, {}) if ok(sw) else {"status": st(sw)}
        one = sw.get("settings", {}).get(f"steps{steps}_pairs1", {}) if ok(sw) else {}
        if ok(r):
            speed = f"x{one['s_per_pair'] / r['s_per_pair']:.2f}" if ok(one) else "—"
            L.append(f"| {r['steps']} | {r['pairs']} | {r['s_median']:.3f} | {r['s_per_pair']:.4f} | {speed} | "
                     f"{_f(pred.get(key), '.2f')} | ok |")
        else:
            L.append(f"| {steps} | {pairs} | — | | | | {st(r)} |")
    L += ["", "## Peak memory of one LoRA update at the presets' native sizes vs the memory plans", "",
          "Diffusion-DPO's update (policy and reference on winner and loser, backward, AdamW), batch 1, bf16 "
          "autocast, gradient checkpointing, frozen weights in bf16 and trained ones in float32 as `loop.setup` holds them; small text "
          "encoders, no VAE. Plan (comparable) = the plan without what is not loaded (text encoders, VAE, DDP buckets). "
          "GB = 1e9 bytes.", "",
          "| model | latents | LoRA rank | plan total (GB) | plan, comparable (GB) | measured peak (GB) | measured - plan | s per update | status |",
          "|---|---|---|---|---|---|---|---|---|"]
    pl = res.get("plans", {})
    for family, _, _ in FAMILY_ROWS:
        r, p = rows.get(family, {}), pl.get(family, {})
        plan_cells = f"{_f(p.get('total_gb'), '.1f')} | {_f(p.get('comparable_gb'), '.1f')}"
        if ok(r):
            gb = None if r.get("peak_mb") is None else r["peak_mb"] * MB / GB
            diff = None if gb is None or p.get("comparable_gb") is None else gb - p["comparable_gb"]
            L.append(f"| {LABEL[family]} | {'x'.join(map(str, r['latents']))} | {r['lora_rank']} | {plan_cells} | "
                     f"{_f(gb, '.1f')} | {_f(diff, '+.1f')} | {r['s_median']:.2f} | ok |")
        else:
            L.append(f"| {LABEL[family]} | | | {plan_cells} | — | | | {st(r)} |")
    L += ["", "Plans: " + "; ".join(f"{LABEL[k]}: {v['source']}" for k, v in pl.items()) + "."]
    return "\n".join(L) + "\n"


def write(res: dict, out: Path) -> None:
    """results/gpu.json and results/gpu.md (rewritten after every row)."""
    out.mkdir(parents=True, exist_ok=True)
    res["ratios"] = ratios(res["rows"])
    res["predicted_ratio"] = predicted(res["rows"], SimpleNamespace(**res["sd15_settings"]))
    (out / "gpu.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "gpu.md").write_text(markdown(res))


def machine(device: torch.device) -> dict:
    """The stamp: device name, library versions, CUDA version (research/bench_report.py's, plus CUDA)."""
    from research.bench_report import machine_info
    info = machine_info(device)
    info["cuda"] = torch.version.cuda
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="The prepared GPU check: SD-1.5 speed and memory at real shapes, "
                                             "the loser-sampling sweep, SDXL / CogVideoX / Wan memory vs plan.")
    ap.add_argument("--dry-run", action="store_true", help="the same code path at tiny widths on the CPU (seconds)")
    ap.add_argument("--plan-only", action="store_true", help="write the tables with every measured cell 'not measured yet'")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole check (default 480)")
    ap.add_argument("--out", help="directory for gpu.md and gpu.json (default results/; a temporary one for --dry-run)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args(argv)
    budget = Budget(args.budget)
    tiny = args.dry_run
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()
                                                              and not tiny) else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # shared CPU cores: one thread is faster than several spinning
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu_check_")) if tiny else ROOT / "results")
    cfg = sd15_settings(tiny)
    res = {"command": "python -m research.gpu_check" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
           "machine": machine(device), "budget_s": args.budget, "tiny": tiny,
           "sd15_settings": {k: getattr(cfg, k) for k in ("resolution", "batch_size", "grad_accum", "lora_rank",
                                                          "mixed_precision", "gradient_checkpointing", "loser_scheduler",
                                                          "loser_steps", "loser_guidance", "loser_every", "loser_batch",
                                                          "pool_storage", "beta")},
           "paper_table4": PAPER, "rows": {}, "plans": plans()}
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.plan_only:
        res["machine"]["device"] = "none (plan only)"
        res["used_s"] = budget.used()
        write(res, out)
        print(f"wrote {out / 'gpu.md'} and {out / 'gpu.json'} (plans only)")
        return 0
    if device.type != "cuda" and not tiny:
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    # Repeats and row caps: a row stops its timed updates at cap_s; need_s is the least budget a row starts with.
    reps = (dict(warmup=0, repeats=1, cap_s=30, need_s=0, family_updates=1) if tiny else
            dict(warmup=1, repeats=5, cap_s=60, need_s=20, family_updates=2))
    rows = res["rows"]
    steps = [("sd15/dpo", lambda: sd15_row("dpo", cfg, device, tiny, budget, reps, log), 30),
             ("sd15/sspo", lambda: sd15_row("sspo", cfg, device, tiny, budget, dict(reps, cap_s=2 * reps["cap_s"]), log), 45),
             ("sd15/sft", lambda: sd15_row("sft", cfg, device, tiny, budget, reps, log), 30),
             ("sweep", lambda: sweep_rows(cfg, device, tiny, budget, dict(reps, cap_s=reps["cap_s"] / 3), log), 30)]
    steps += [(family, (lambda f=family, p=name, r=rank: family_row(f, p, r, device, tiny, budget, reps, log)), 30)
              for family, name, rank in FAMILY_ROWS]
    for key, fn, need in steps:
        attempt(rows, key, fn, budget, 0 if tiny else need, device, log)
        res["used_s"] = budget.used()
        write(res, out)
    print(markdown(res))
    print(f"wrote {out / 'gpu.md'} and {out / 'gpu.json'} in {budget.used():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
