"""The entry point: train one model, and on the embedded default also judge it.

    python train.py                                   # the embedded default: SSPO on digits
    python train.py --method=dpo --max_steps=200      # any config key, see --help
    torchrun --nproc_per_node=8 train.py --config=sd15_pickapic --method=sspo

Order of work: resolve the config (config.py); on digits, build the misaligned base if it is not
cached (digits/, its own small loop); train (``train`` below: the outer loop of SSPO's
Algorithm 1 over loop.py's steps); on digits, judge the final model against its base
(evaluate.py). Exit codes: 0 done, 2 bad input, settings or files (one message on stderr, its cause kept, no
traceback), 143 preempted by SIGTERM and 130 stopped by Ctrl-C (checkpoint saved; --resume
continues it).
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


def run(overrides: dict | None = None, argv: list[str] | None = None, unlock: bool = True) -> Path:
    """Resolve the config, set up (or join) torch.distributed, train; returns the output dir.
    ``unlock=False`` keeps the run directory's lock (main: until the judge has written eval.json)."""
    cfg = config_mod.resolve(overrides, argv)
    ctx = runtime.setup_distributed(cfg.dist_timeout)
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
        if unlock:
            runtime.unlock_run_dirs()
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
        raise runtime.Preempted(step, stop.signum)  # main: exit code 143 (130 for Ctrl-C), never "done:"
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
            out = run(argv=argv, unlock=False)
        if rank0:
            cfg = json.loads((out / "config.json").read_text())
            if cfg["model"] == "digits" and (out / "final").exists():
                evaluate.report_digits_run(out)  # the independent judge: how well it follows prompts
    except runtime.Preempted as e:
        if rank0:
            print(str(e), flush=True)  # "preempted at step N, checkpoint saved"
        return e.exit_code  # 143 (SIGTERM), 130 (Ctrl-C)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, or a second one inside it
        if rank0:
            print("interrupted (Ctrl-C) without saving; the checkpoints in out_dir/checkpoints are kept and "
                  "--resume continues from the newest", file=sys.stderr, flush=True)
        return 130
    except (ValueError, FloatingPointError, data.TooManyBadItems) as e:
        print(f"error: {_message(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing, read-only or full path: which one, and what to do
        msg = _message(e) if e.strerror is None else (
            f"{e.strerror}: {e.filename}; check that the path exists, is writable and has free space "
            f"(existing checkpoints are kept)")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ == "SafetensorError":  # safetensors' writer: a full disk or a lost folder
            print(f"error: cannot write a safetensors file ({_message(e)}): free disk space or fix the path; "
                  f"the checkpoints already written are kept, --resume continues from the newest",
                  file=sys.stderr)
            return 2
        if isinstance(e, RuntimeError) and os.environ.get("WORLD_SIZE", "1") != "1" and "Timed out" in str(e):
            print(f"error: a collective timed out, another rank stopped, hung or died ({_message(e)}); "
                  f"the newest checkpoint is kept, --resume continues it (--dist_timeout sets the wait)",
                  file=sys.stderr)
            return 1
        if not isinstance(e, RuntimeError) or "DataLoader worker" not in str(e):
            raise
        print(f"error: {_message(e)}; the data loader lost a worker process (out of memory, or killed): "
              f"lower --num_workers or --batch_size, then --resume", file=sys.stderr)
        return 2
    finally:
        runtime.unlock_run_dirs()
    if rank0:
        print(f"done: {out} (samples/, metrics.jsonl, checkpoints/, final/"
              f"{', eval.json' if (out / 'eval.json').exists() else ''})")
        if (out / evaluate.PICTURE).is_file():  # the last line: what to look at
            print(f"picture: {out / evaluate.PICTURE} (base above, aligned below, one column per prompted digit)")
    return 0


def _message(e: BaseException) -> str:
    """The whole message, its cause kept (several lines where it has them), without a traceback:
    when a DataLoader worker wrapped it in its traceback text, the message that text ends with."""
    import re
    lines = [line.rstrip() for line in (str(e).strip() or type(e).__name__).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):  # torch's ExceptionWrapper text
        head = re.compile(rf"^[\w.]*{re.escape(type(e).__name__)}: ")
        starts = [i for i, line in enumerate(lines) if head.match(line)]
        if starts:
            lines = [head.sub("", lines[starts[-1]])] + lines[starts[-1] + 1:]
    more = f"\n(... {len(lines) - 20} more lines)" if len(lines) > 20 else ""
    return "\n".join(lines[:20]) + more


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
