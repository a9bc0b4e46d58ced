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
import trackers

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
# Checkpoints: out/checkpoints/step_XXXXXX/{trainable.safetensors, state.safetensors, state.json}.
# Nothing is unpickled: state.json holds the training state's structure (numbers, strings, lists)
# with each tensor replaced by a key into state.safetensors, plus the byte size of every file
# (a truncated copy is caught). Replay snapshots are files of out/replay, written once and named
# in state.json. Each checkpoint is written into a temporary directory and renamed into place,
# so a crash leaves the previous checkpoints and maybe the new one, never half of one. Resume
# scans the directory for the newest complete checkpoint (checkpoints/latest is informative only).
# ---------------------------------------------------------------------------------------------


class Preempted(Exception):
    """A SIGTERM stopped the run after saving; train.py exits with code 143 (128 + SIGTERM)."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}, checkpoint saved")
        self.step = step


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def pack_state(obj, tensors: dict):
    """A tree of dicts/lists/tuples/numbers/strings/tensors/arrays -> JSON-able tree; tensors go
    into ``tensors`` under the key that replaces them. Anything else is refused, never pickled."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: pack_state(v, tensors) for k, v in obj.items()}
        return {"__items__": [[pack_state(k, tensors), pack_state(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack_state(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [pack_state(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def unpack_state(obj, tensors: dict):
    """Inverse of ``pack_state``."""
    if isinstance(obj, list):
        return [unpack_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(unpack_state(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {unpack_state(k, tensors): unpack_state(v, tensors) for k, v in obj["__items__"]}
    return {k: unpack_state(v, tensors) for k, v in obj.items()}


def save_checkpoint(out: Path, step: int, bundle, opt, lr_sched, scaler, pool, cfg, ctx: Dist) -> None:
    ckdir = out / "checkpoints"
    if ctx.rank == 0:
        final = ckdir / f"step_{step:06d}"
        tmp = ckdir / f".tmp_step_{step:06d}_{os.getpid()}"
        try:
            ckdir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            weights = {k: v.detach().cpu().contiguous() for k, v in bundle.trainable_state_dict().items()}
            save_file(weights, str(tmp / "trainable.safetensors"))
            tensors: dict = {}
            tree = pack_state({"optimizer": opt.state_dict(), "lr_scheduler": lr_sched.state_dict(),
                               "scaler": scaler.state_dict(), "rng": _rng_state(),
                               "pool": pool.state_dict() if pool is not None else None}, tensors)
            save_file(tensors, str(tmp / "state.safetensors"))
            sizes = {n: (tmp / n).stat().st_size for n in ("trainable.safetensors", "state.safetensors")}
            (tmp / "state.json").write_text(json.dumps({"format": 1, "step": step, "files": sizes, "state": tree,
                                                        "config": config_mod.to_dict(cfg)}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            (ckdir / "latest.tmp").write_text(final.name)  # for people; resume scans the directory
            os.replace(ckdir / "latest.tmp", ckdir / "latest")
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"cannot write the step {step} checkpoint in {ckdir} ({type(e).__name__}: {e}); "
                          f"earlier checkpoints are kept: free disk space or fix permissions, then --resume") from e
        if cfg.keep_checkpoints > 0:
            for p in checkpoint_dirs(out)[cfg.keep_checkpoints:]:
                shutil.rmtree(p, ignore_errors=True)
    ctx.barrier()


def checkpoint_dirs(out: Path) -> list[Path]:
    """out/checkpoints/step_* directories, newest first (complete or not)."""
    ckdir = Path(out) / "checkpoints"
    found = [p for p in ckdir.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if ckdir.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def latest_step(out: Path) -> int | None:
    """Step of the newest checkpoint directory that holds its state.json (None if none)."""
    for d in checkpoint_dirs(out):
        if (d / "state.json").is_file():
            return int(d.name[5:])
    return None


def read_checkpoint(d: Path) -> tuple[dict, dict]:
    """(trainable weights, manifest with its "state" unpacked); raises if any file is missing,
    truncated or unreadable."""
    if not (d / "state.json").is_file():
        raise FileNotFoundError("no state.json (incomplete, or written by an older version)")
    manifest = json.loads((d / "state.json").read_text())
    for name, size in manifest["files"].items():
        got = (d / name).stat().st_size if (d / name).is_file() else None
        if got != size:
            raise ValueError(f"{name} is {'missing' if got is None else f'{got} bytes'}, expected {size} bytes")
    weights = load_file(str(d / "trainable.safetensors"))
    manifest["state"] = unpack_state(manifest["state"], load_file(str(d / "state.safetensors")))
    return weights, manifest


def chosen_step(out: Path, which: str) -> int:
    """The step of checkpoint ``which`` (step_N, or a path to out/checkpoints/step_N)."""
    name = Path(which).name
    if not name.startswith("step_") or not (Path(out) / "checkpoints" / name).is_dir():
        have = sorted(p.name for p in (Path(out) / "checkpoints").glob("step_*"))
        raise FileNotFoundError(f"resume_from_checkpoint={which!r}: no such checkpoint in {Path(out) / 'checkpoints'} "
                                f"(have: {', '.join(have) or 'none'})")
    return int(name.split("_")[-1])


# Keys whose change breaks "a resumed run equals an uninterrupted one" (max_steps may grow).
TRAJECTORY_KEYS = ("method", "ssr", "replay", "model", "model_path", "data", "data_path", "beta",
                   "tau", "eps_clip", "save_every", "loser_steps", "loser_guidance", "batch_size",
                   "grad_accum", "lr", "warmup_steps", "lr_scheduler", "seed", "lora_rank", "mixed_precision", "cfg_drop")


def check_resume_config(saved: dict, now: dict) -> None:
    keys = TRAJECTORY_KEYS + (("max_steps",) if now.get("lr_scheduler") in ("linear", "cosine") else ())
    diff = {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
    if diff:
        raise ValueError("--resume with a config that changes the run: " + ", ".join(
            f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()) + "; use a new --out_dir instead")


def load_latest(out: Path, bundle, opt, lr_sched, scaler, pool, cfg, which: str = "latest") -> int | None:
    """Restore everything from the newest complete checkpoint; returns its step, or None if
    out/checkpoints holds no checkpoint at all. A damaged newest checkpoint is skipped with one
    warning line; if none is usable, a ValueError says why (train.py: exit code 2). ``which``
    (--resume_from_checkpoint): step_N or a path to such a directory, that one only (no fallback)."""
    dirs = checkpoint_dirs(out) if which == "latest" else \
        [Path(out) / "checkpoints" / f"step_{chosen_step(out, which):06d}"]
    if not dirs:
        print(f"resume: no checkpoint in {Path(out) / 'checkpoints'}; starting from scratch", flush=True)
        return None
    skipped = []
    for d in dirs:
        try:
            weights, manifest = read_checkpoint(d)
        except Exception as e:
            skipped.append(f"{d.name} ({type(e).__name__}: {e})")
            continue
        check_resume_config(manifest["config"], config_mod.to_dict(cfg))  # a refusal, not a fallback
        state = manifest["state"]
        try:
            models.load_trainable(bundle, weights)
            opt.load_state_dict(state["optimizer"])
            lr_sched.load_state_dict(state["lr_scheduler"])
            scaler.load_state_dict(state["scaler"])
            if pool is not None and state["pool"] is not None:
                pool.load_state_dict(state["pool"])
            _set_rng_state(state["rng"])
        except Exception as e:  # an older checkpoint, if usable, overwrites all of the above
            skipped.append(f"{d.name} ({type(e).__name__}: {e})")
            continue
        if skipped:
            print(f"warning: resume skipped damaged checkpoint(s): {'; '.join(skipped)}", flush=True)
        return int(manifest["step"])
    raise ValueError(f"resume: no usable checkpoint in {Path(out) / 'checkpoints'}: {'; '.join(skipped)}. "
                     f"Restore a checkpoint, or start afresh with --overwrite (this deletes the run)")


def truncate_metrics(out: Path, step: int) -> None:
    """Drop metrics.jsonl rows logged after ``step`` (and any torn last line), atomically."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def setup_logging(out: Path, rank: int):
    """Python logging for a run (data.py's skips, ...): rank 0 to the console, every rank to
    out/logs/rank<r>.log. Replaces what an earlier call set up; returns a function that closes it."""
    import logging
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_sspo_run", False)]:
        root.removeHandler(h)
        h.close()
    (Path(out) / "logs").mkdir(parents=True, exist_ok=True)
    handlers = [logging.FileHandler(Path(out) / "logs" / f"rank{rank}.log")]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
        handlers[1].setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for h in handlers:
        h._sspo_run = True
        h.setLevel(logging.INFO)
        root.addHandler(h)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))

    def close():
        for h in handlers:
            root.removeHandler(h)
            h.close()
    return close


# ---------------------------------------------------------------------------------------------
# Logging and signals
# ---------------------------------------------------------------------------------------------


class Logger:
    """Rank 0: a line per log interval (progress, rate and ETA: the only progress display when
    stderr is not a terminal), one JSON object per line in metrics.jsonl, tqdm when stderr is a
    terminal, and the same rows and the sample grids to the ``report_to`` tracker. Metrics are
    averaged over ranks at log steps only."""

    def __init__(self, cfg, ctx: Dist, out: Path):
        self.cfg, self.ctx, self.out = cfg, ctx, out
        self.t_start, self.window = time.perf_counter(), []
        self.bar = None
        if ctx.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.max_steps, desc=cfg.method, dynamic_ncols=True)
        self.tracker = trackers.make(cfg.report_to, out, config_mod.to_dict(cfg), cfg.tracker_project_name) \
            if ctx.rank == 0 else None

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
        rate = self.cfg.batch_size * self.cfg.grad_accum * self.ctx.world / sec
        row.update(step=step, lr=lr, sec_per_step=sec, samples_per_sec=rate, time=time.time())
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tracker:
            self.tracker.log(row, step)
        eta = sec * (self.cfg.max_steps - step)
        parts = [f"step {step}/{self.cfg.max_steps}", f"loss {row['loss']:.4f}"]
        for key, name in (("implicit_acc", "acc"), ("ssr_rate", "ssr"), ("reward_margin", "margin")):
            if key in row:
                parts.append(f"{name} {row[key]:.3f}")
        parts += [f"lr {lr:.1e}", f"{sec:.2f} s/step", f"{rate:.1f} samples/s", f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"]
        self.info(" | ".join(parts))

    def samples(self, bundle, step: int, shape: tuple) -> None:
        """Rank 0: the sample grid of ``step`` (save_samples), also to the tracker."""
        if self.ctx.rank != 0:
            return
        path = save_samples(self.cfg, bundle, self.out, step, shape)
        if self.tracker:
            with Image.open(path) as im:
                self.tracker.image("samples", im.convert("RGB"), step)

    def close(self):
        if self.bar:
            self.bar.close()
        if self.tracker:
            self.tracker.close()
            self.tracker = None


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
    """The first ``n`` of ``cfg.validation_prompts`` (a file, one prompt per line, or prompts
    separated by '|'), else the digits captions or the built-in set."""
    if cfg.validation_prompts:
        src = Path(cfg.validation_prompts)
        text = src.read_text() if src.is_file() else cfg.validation_prompts.replace("|", "\n")
        prompts = [p.strip() for p in text.splitlines() if p.strip()]
        if not prompts:
            raise ValueError(f"validation_prompts {cfg.validation_prompts!r} holds no prompt")
        return prompts[:n]
    if cfg.model == "digits":
        return [digits.digit_caption(d % 10, digits.TRAIN_TEMPLATES[0]) for d in range(n)]
    return SAMPLE_PROMPTS[:n]


def _grid(x: torch.Tensor, upscale: int = 1) -> Image.Image:
    """(N,C,H,W) in [-1,1] -> one row-major grid image (5 columns; black cells pad the last row)."""
    from diffusers.utils import make_image_grid
    n, c, h, w = x.shape
    cols = min(5, n)
    rows = math.ceil(n / cols)
    arr = ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()  # (N,H,W,C)
    cells = [Image.fromarray(a[..., 0] if c == 1 else a[..., :3]) for a in arr]
    cells += [Image.new(cells[0].mode, cells[0].size)] * (rows * cols - n)
    img = make_image_grid(cells, rows, cols)
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
