"""The entry point: train one model, and on the embedded default also judge it.

    python train.py                                   # the embedded default: SSPO on digits
    python train.py --method=dpo --max_steps=200      # any config key, see --help
    torchrun --nproc_per_node=8 train.py --config=sd15_pickapic --method=sspo

Order of work: resolve the config (config.py); on digits, build the misaligned base if it is not
cached (digits/, its own small loop); train (``train`` below: the outer loop of SSPO's
Algorithm 1 over loop.py's steps); on digits, judge the final model against its base
(evaluate.py). Exit codes: 0 done, 2 bad input, settings or files (one line on stderr), 143
preempted by SIGTERM (checkpoint saved; --resume continues it).
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import config as config_mod
import data
import digits
import evaluate
import loop
from config import Config
from infra import checkpoints, runtime


def run(overrides: dict | None = None, argv: list[str] | None = None) -> Path:
    """Resolve the config, set up (or join) torch.distributed, train; returns the output dir."""
    cfg = config_mod.resolve(overrides, argv)
    ctx = runtime.setup_distributed()
    close_logs = None
    try:
        close_logs = runtime.setup_logging(Path(cfg.out_dir), ctx.rank)
        if cfg.model == "digits" and not cfg.model_path and cfg.init == "pretrained":
            if ctx.rank == 0:
                digits.ensure_base(cfg.cache_dir, cfg.digits_base_steps, cfg.digits_corrupt)
            ctx.barrier()
        return train(cfg, ctx)
    finally:
        if close_logs:
            close_logs()
        ctx.teardown()


def train(cfg: Config, ctx: runtime.Dist) -> Path:
    """Train until max_steps and return the output dir; on SIGTERM save and raise Preempted.

    SSPO's Algorithm 1: each update draws a reference checkpoint from the pool, samples the
    losers with it and takes one optimizer step (loop.update); every replay_every updates (K) the
    policy joins the pool as a new checkpoint (Random Checkpoint Replay); every save_every a training
    checkpoint is written."""
    run = loop.setup(cfg, ctx)
    step = loop.start(run)
    stream = loop.batches(run, step)
    stop = runtime.StopOnSignal()
    run.bundle.unet.train()
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            metrics = loop.update(run, stream, step, stop)
            if metrics is not None:
                step += 1
                if run.ema is not None:
                    run.ema.step(run.params)
                lr = float(metrics.pop("lr"))
                run.logger.step(step, metrics, lr, time.perf_counter() - t0)
            stopping = metrics is None or ctx.any_flag(stop.requested)
            if step % config_mod.replay_interval(cfg) == 0 and metrics is not None and run.method.losers == "replayed":
                run.pool.add(run.bundle.trainable_state_dict(), step)
            if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
                checkpoints.save_checkpoint(run.out, step, run.bundle, run.opt, run.lr_sched, run.scaler,
                                            run.pool, cfg, ctx, ema=run.ema)
            if cfg.sample_every and step % cfg.sample_every == 0 and metrics is not None:
                run.logger.samples(run.bundle, step, run.shape)
            if stopping:
                break
    finally:
        stop.restore()
    loop.finish(run, step)
    if step < cfg.max_steps:
        raise runtime.Preempted(step)  # main: exit code 143, never "done:"
    return run.out


def _one_line_for_settings(show):
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, config_mod.IgnoredSettingWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(config_mod.help_text())
        return 0
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        with warnings.catch_warnings():  # ignored settings: one line each, from rank 0 only
            warnings.simplefilter("always" if rank0 else "ignore", config_mod.IgnoredSettingWarning)
            warnings.showwarning = _one_line_for_settings(warnings.showwarning)
            out = run(argv=argv)
    except runtime.Preempted as e:
        if rank0:
            print(str(e), flush=True)  # "preempted at step N, checkpoint saved"
        return 143
    except (ValueError, FloatingPointError, data.TooManyBadItems) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing, read-only or full path: which one, and what to do
        msg = _one_line(e) if e.strerror is None else (
            f"{e.strerror}: {e.filename}; check that the path exists, is writable and has free space "
            f"(existing checkpoints are kept)")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if rank0:
        cfg = json.loads((out / "config.json").read_text())
        if cfg["model"] == "digits" and (out / "final").exists():
            evaluate.report_digits_run(out)  # the independent judge: how well it follows prompts
        print(f"done: {out} (samples/, metrics.jsonl, checkpoints/, final/"
              f"{', eval.json' if (out / 'eval.json').exists() else ''})")
        if (out / evaluate.PICTURE).is_file():  # the last line: what to look at
            print(f"picture: {out / evaluate.PICTURE} (base above, aligned below, one column per prompted digit)")
    return 0


def _one_line(e: Exception) -> str:
    """The message itself, also when a DataLoader worker wrapped it in its traceback text."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    return lines[-1].split(f"{type(e).__name__}: ", 1)[-1] if len(lines) > 1 else lines[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
