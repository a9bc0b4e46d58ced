"""Training infrastructure kept out of the loop: torch.distributed setup, atomic checkpoints,
logging (console line, JSONL, tqdm), SIGTERM handling and sample grids."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file, save_file

import config as config_mod
import digits
import models
import sampling

# ---------------------------------------------------------------------------------------------
# torch.distributed (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT)
# ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True if we created the process group (and so destroy it)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def _reduce(self, value: float, op) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=op)
        return t.item()

    def all_finite(self, x: torch.Tensor) -> bool:
        """True on every rank iff x is finite on every rank (so all ranks stop together)."""
        return self._reduce(float(torch.isfinite(x).all()), dist.ReduceOp.MIN) > 0.5

    def any_flag(self, flag: bool) -> bool:
        return self._reduce(float(flag), dist.ReduceOp.MAX) > 0.5

    def mean(self, x: torch.Tensor) -> float:
        return self._reduce(float(x), dist.ReduceOp.SUM) / self.world

    def teardown(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed() -> Dist:
    """One process, or one rank of a torchrun job (nccl on GPU, gloo on CPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return Dist(device=dev)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local, torch.device("cuda", local) if cuda else torch.device("cpu"), owns)


def log0(ctx: Dist, msg: str):
    if ctx.rank == 0:
        print(msg, flush=True)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Checkpoints: out/checkpoints/step_XXXXXX/{trainable.safetensors,state.pt}, out/checkpoints/latest
# Each is written into a temporary directory and renamed into place, so a crash leaves either
# the previous checkpoint or the new one, never half of one.
# ---------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out: Path, step: int, bundle, opt, lr_sched, scaler, pool, cfg, ctx: Dist) -> None:
    ckdir = out / "checkpoints"
    if ctx.rank == 0:
        ckdir.mkdir(parents=True, exist_ok=True)
        final = ckdir / f"step_{step:06d}"
        tmp = ckdir / f".tmp_step_{step:06d}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {k: v.detach().cpu().contiguous() for k, v in bundle.trainable_state_dict().items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"step": step, "optimizer": opt.state_dict(), "lr_scheduler": lr_sched.state_dict(),
                    "scaler": scaler.state_dict(), "pool": pool.state_dict() if pool is not None else None,
                    "rng": _rng_state(), "config": config_mod.to_dict(cfg)}, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest = ckdir / "latest"
        (ckdir / "latest.tmp").write_text(final.name)
        os.replace(ckdir / "latest.tmp", latest)
        if cfg.keep_checkpoints > 0:
            old = sorted(p for p in ckdir.glob("step_*") if p.is_dir())[:-cfg.keep_checkpoints]
            for p in old:
                shutil.rmtree(p, ignore_errors=True)
    ctx.barrier()


def latest_step(out: Path) -> int | None:
    f = Path(out) / "checkpoints" / "latest"
    return int(f.read_text().strip().split("_")[-1]) if f.exists() else None


# Keys whose change breaks "a resumed run equals an uninterrupted one" (max_steps may grow).
TRAJECTORY_KEYS = ("method", "ssr", "replay", "model", "model_path", "data", "data_path", "beta",
                   "tau", "eps_clip", "save_every", "loser_steps", "loser_guidance", "loser_scheduler",
                   "loser_every", "batch_size",
                   "grad_accum", "lr", "warmup_steps", "seed", "lora_rank", "mixed_precision", "cfg_drop")


def check_resume_config(saved: dict, now: dict) -> None:
    diff = {k: (saved.get(k), now.get(k)) for k in TRAJECTORY_KEYS if saved.get(k) != now.get(k)}
    if diff:
        raise ValueError("--resume with a config that changes the run: " + ", ".join(
            f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()) + "; use a new --out_dir instead")


def load_latest(out: Path, bundle, opt, lr_sched, scaler, pool, cfg) -> int | None:
    """Restore everything from out/checkpoints/latest; returns its step, or None if none exists."""
    step = latest_step(out)
    if step is None:
        print(f"resume: no checkpoint in {out / 'checkpoints'}; starting from scratch", flush=True)
        return None
    d = Path(out) / "checkpoints" / f"step_{step:06d}"
    models.load_trainable(bundle, load_file(str(d / "trainable.safetensors")))
    state = torch.load(d / "state.pt", map_location="cpu", weights_only=False)
    check_resume_config(state["config"], config_mod.to_dict(cfg))
    opt.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_scheduler"])
    scaler.load_state_dict(state["scaler"])
    if pool is not None and state["pool"] is not None:
        pool.load_state_dict(state["pool"])
    _set_rng_state(state["rng"])
    return step


# ---------------------------------------------------------------------------------------------
# Logging and signals
# ---------------------------------------------------------------------------------------------


class Logger:
    """Rank 0: a line per log interval, one JSON object per line in metrics.jsonl, tqdm when
    stderr is a terminal. Metrics are averaged over ranks at log steps only."""

    def __init__(self, cfg, ctx: Dist, out: Path):
        self.cfg, self.ctx, self.out = cfg, ctx, out
        self.t_start, self.window = time.perf_counter(), []
        self.bar = None
        if ctx.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.max_steps, desc=cfg.method, dynamic_ncols=True)

    def info(self, msg: str):
        if self.ctx.rank == 0:
            (self.bar.write if self.bar else print)(msg)
            sys.stdout.flush()

    def step(self, step: int, metrics: dict, lr: float, seconds: float):
        self.window.append(seconds)
        if self.bar:
            if self.bar.n == 0 and step > 1:
                self.bar.update(step - 1)
            self.bar.update(1)
        if step % self.cfg.log_every and step != self.cfg.max_steps:
            return
        row = {k: self.ctx.mean(v) for k, v in sorted(metrics.items())}  # collective on all ranks
        if self.ctx.rank != 0:
            return
        sec = sum(self.window) / len(self.window)
        self.window = []
        row.update(step=step, lr=lr, sec_per_step=sec, time=time.time())
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        eta = sec * (self.cfg.max_steps - step)
        parts = [f"step {step}/{self.cfg.max_steps}", f"loss {row['loss']:.4f}"]
        for key, name in (("implicit_acc", "acc"), ("ssr_rate", "ssr"), ("reward_margin", "margin")):
            if key in row:
                parts.append(f"{name} {row[key]:.3f}")
        parts += [f"lr {lr:.1e}", f"{sec:.2f} s/step", f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"]
        self.info(" | ".join(parts))

    def close(self):
        if self.bar:
            self.bar.close()


class StopOnSignal:
    """SIGTERM sets a flag that the loop checks between micro-steps and after each update (then
    saves and exits). Ctrl-C (SIGINT) still interrupts at once, without saving."""

    def __init__(self):
        self.requested = False
        self._old = {}
        if hasattr(signal, "SIGTERM") and _main_thread():
            for sig in (signal.SIGTERM,):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------
# Sample grids: fixed prompts, fixed seed, the policy itself, 20 DDIM steps
# ---------------------------------------------------------------------------------------------

SAMPLE_PROMPTS = [
    "a photo of an astronaut riding a horse on the moon", "a cozy cabin in a snowy forest at dusk",
    "a bowl of ramen, studio lighting", "a watercolor painting of a lighthouse",
    "a cat wearing sunglasses on a beach", "time-lapse of a flower blooming",
    "a city skyline at night, long exposure", "an ice cube melting on a wooden table",
    "a portrait of an old fisherman, dramatic light", "a red sports car in the rain",
]


def sample_prompts(cfg, n: int) -> list[str]:
    if cfg.model == "digits":
        return [digits.digit_caption(d % 10, digits.TRAIN_TEMPLATES[0]) for d in range(n)]
    return SAMPLE_PROMPTS[:n]


def _grid(x: torch.Tensor, upscale: int = 1) -> Image.Image:
    """(N,C,H,W) in [-1,1] -> one row-major grid image (5 columns)."""
    n, c, h, w = x.shape
    cols = min(5, n)
    rows = math.ceil(n / cols)
    canvas = torch.full((c, rows * (h + 1), cols * (w + 1)), -1.0)
    for i in range(n):
        r, k = divmod(i, cols)
        canvas[:, r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = x[i]
    arr = ((canvas + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr[..., :3])
    return img.resize((img.width * upscale, img.height * upscale), Image.NEAREST) if upscale > 1 else img


@torch.no_grad()
def save_samples(cfg, bundle: models.Bundle, out: Path, step: int, shape: tuple) -> Path:
    prompts = sample_prompts(cfg, cfg.num_sample_prompts)
    z = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(cfg.seed))
    lat = sampling.sample_with_policy(bundle, prompts, latents=z, num_inference_steps=20,
                                      guidance_scale=cfg.loser_guidance, latent_shape=shape)
    px = models.decode_latents(bundle, lat).float().clamp(-1, 1).cpu()  # (N,C,H,W) or (N,C,F,H,W)
    frames = [px] if px.ndim == 4 else [px[:, :, f] for f in range(px.shape[2])]
    grids = [_grid(f, upscale=8 if bundle.family == "digits" else 1) for f in frames]
    d = out / "samples"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{step:06d}.png"
    grids[0].save(path)
    if len(grids) > 1:
        path = d / f"step_{step:06d}.gif"
        grids[0].save(path, save_all=True, append_images=grids[1:], duration=125, loop=0)
    return path
