"""Training infrastructure kept out of the loop: torch.distributed setup,
logging (console line, JSONL, tqdm), SIGTERM handling and sample grids."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

import config as config_mod
import models
from models import sampling, sharding
from infra import trackers

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


def setup_distributed(timeout_s: float = 1800) -> Dist:
    """One process, or one rank of a torchrun job (nccl on GPU, gloo on CPU). A collective that
    waits more than ``timeout_s`` for a stopped or hung rank fails, which ends the job (torchrun
    stops the other ranks); the newest checkpoint is kept."""
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
        from datetime import timedelta
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return Dist(rank, world, local, torch.device("cuda", local) if cuda else torch.device("cpu"), owns)


# ---------------------------------------------------------------------------------------------
# One writer per run directory: rank 0 holds an exclusive flock on out_dir/.lock for the whole run
# ---------------------------------------------------------------------------------------------

_LOCKS: dict[str, int] = {}  # resolved out_dir -> file descriptor of its held .lock


def lock_run_dir(out: Path) -> None:
    """Take the run directory's lock (non-blocking) or raise ValueError naming the holder. The
    kernel drops the lock when the process ends, however it ends (kill -9 included)."""
    import fcntl
    out = Path(out)
    key = str(out.resolve())
    if key in _LOCKS:
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"out_dir {out} is in use by another run (pid {holder} holds {out / '.lock'}); "
                         f"nothing was changed: wait for that run to end, or use another --out_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd


def unlock_run_dirs() -> None:
    """Release every run-directory lock this process holds (the end of train.run)."""
    while _LOCKS:
        os.close(_LOCKS.popitem()[1])  # closing the descriptor releases its flock


def log0(ctx: Dist, msg: str):
    if ctx.rank == 0:
        print(msg, flush=True)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class Preempted(Exception):
    """A SIGTERM or Ctrl-C (SIGINT) stopped the run after saving; train.py exits with 128 + the
    signal's number: 143 for SIGTERM, 130 for Ctrl-C."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "preempted"
        super().__init__(f"{what} at step {step}, checkpoint saved")
        self.step, self.exit_code = step, 128 + int(signum)


def setup_logging(out: Path, rank: int):
    """Python logging for a run (data/__init__.py's skips, ...): rank 0 to the console, every rank to
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
        self.tracker, self._tracker_due = None, ctx.rank == 0 and cfg.report_to != "none"

    def open_tracker(self, resumed: int | None = None) -> None:
        """Rank 0: open the ``report_to`` tracker, once the run is known to start or resume (a
        refused resume leaves no empty event file); resumed at step N, TensorBoard purges from N+1."""
        if self._tracker_due:
            self._tracker_due = False
            self.tracker = trackers.make(self.cfg.report_to, self.out, config_mod.to_dict(self.cfg),
                                         self.cfg.tracker_project_name, None if resumed is None else resumed + 1)

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
        self.open_tracker()
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
        """Rank 0: the sample grid of ``step`` (save_samples), also to the tracker. A sharded
        (FSDP) model samples on every rank, as its forwards are collectives; rank 0 writes."""
        sharded = sharding.is_sharded(bundle.unet)
        if self.ctx.rank != 0 and not sharded:
            return
        path = save_samples(self.cfg, bundle, self.out, step, shape, write=self.ctx.rank == 0)
        if self.ctx.rank != 0:
            return
        self.open_tracker()
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
    """SIGTERM or Ctrl-C (SIGINT) sets a flag that the loop checks between micro-steps and after
    each update (then saves and exits: train.py's Preempted). A second Ctrl-C interrupts at once,
    without saving (the newest checkpoint stays the one to resume from)."""

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGTERM
        self._old = {}
        if _main_thread():
            for sig in (getattr(signal, "SIGTERM", None), signal.SIGINT):
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.signum = signum
        self.requested = True

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------
# Sample grids: fixed prompts, fixed seed, the policy itself, 20 DDIM steps; each cell's prompt
# written under it
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
    separated by '|'; the digits preset names one per digit), else the built-in set."""
    if cfg.validation_prompts:
        src = Path(cfg.validation_prompts)
        text = src.read_text() if src.is_file() else cfg.validation_prompts.replace("|", "\n")
        prompts = [p.strip() for p in text.splitlines() if p.strip()]
        if not prompts:
            raise ValueError(f"validation_prompts {cfg.validation_prompts!r} holds no prompt")
        return prompts[:n]
    return SAMPLE_PROMPTS[:n]


def _grid(x: torch.Tensor, upscale: int = 1, labels: list[str] | None = None) -> Image.Image:
    """(N,C,H,W) in [-1,1] -> one row-major grid image (5 columns; black cells pad the last row);
    with ``labels``, each cell carries its text (the prompt) underneath."""
    from diffusers.utils import make_image_grid
    n, c, h, w = x.shape
    cols = min(5, n)
    rows = math.ceil(n / cols)
    arr = ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()  # (N,H,W,C)
    cells = [Image.fromarray(a[..., 0] if c == 1 else a[..., :3]) for a in arr]
    if upscale > 1:
        cells = [im.resize((w * upscale, h * upscale), Image.NEAREST) for im in cells]
    if labels is not None:
        cells = [labelled(im, text) for im, text in zip(cells, list(labels) + [""] * n)]
    cells += [Image.new(cells[0].mode, cells[0].size)] * (rows * cols - n)
    return make_image_grid(cells, rows, cols)


def _font(size: int = 10):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font: no font file needed


def text_lines(text: str, width_px: int, max_lines: int = 3, size: int = 10) -> list[str]:
    """``text`` wrapped by words to ``width_px`` in the default font; the last line is cut."""
    font, lines, cur = _font(size), [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if cur and font.getlength(trial) > width_px:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    lines.append(cur)
    return lines[:max_lines]


def labelled(image: Image.Image, text: str, max_lines: int = 3) -> Image.Image:
    """``image`` above a white band holding ``text`` (wrapped; the same band height for every text)."""
    from PIL import ImageDraw
    w = max(image.width, 96)
    out = Image.new("RGB", (w, image.height + 12 * max_lines + 4), "white")
    out.paste(image.convert("RGB"), ((w - image.width) // 2, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(text_lines(text, w - 6, max_lines)):
        draw.text((3, image.height + 2 + 12 * i), line, fill="black", font=_font())
    return out


def autocast_dtype(cfg) -> torch.dtype | None:
    """The autocast (and frozen-weight) dtype of ``mixed_precision``: bf16, fp16, or None (no)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)


def autocast(cfg, device: torch.device):
    """() -> the context manager the run's forwards run in: torch.autocast, or nothing."""
    dtype = autocast_dtype(cfg)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext


def save_samples(cfg, bundle: models.Bundle, out: Path, step: int, shape: tuple, write: bool = True) -> Path:
    prompts = sample_prompts(cfg, cfg.num_sample_prompts)
    z = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(cfg.seed))
    with autocast(cfg, bundle.device)():  # as the run trains: its frozen weights are in that dtype
        lat = sampling.sample_with_policy(bundle, prompts, latents=z, num_inference_steps=20,
                                          guidance_scale=cfg.loser_guidance, latent_shape=shape)
    d = out / "samples"
    path = d / f"step_{step:06d}.png"
    if not write:  # an FSDP rank other than 0 took part in the sampling only
        return path
    px = models.decode_latents(bundle, lat).float().clamp(-1, 1).cpu()  # (N,C,H,W) or (N,C,F,H,W)
    frames = [px] if px.ndim == 4 else [px[:, :, f] for f in range(px.shape[2])]
    grids = [_grid(f, upscale=8 if bundle.family == "digits" else 1, labels=prompts) for f in frames]
    d.mkdir(parents=True, exist_ok=True)
    grids[0].save(path)
    if len(grids) > 1:
        path = d / f"step_{step:06d}.gif"
        grids[0].save(path, save_all=True, append_images=grids[1:], duration=125, loop=0)
    return path
