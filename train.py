"""The entry point: train one model, and on the embedded default also judge it.

    python train.py                                   # the embedded default: SSPO on digits
    python train.py --method=dpo --max_steps=200      # any config key, see --help
    torchrun --nproc_per_node=8 train.py --config=sd15_pickapic --method=sspo

Order of work: resolve the config (config.py); on digits, build the misaligned base if it is not
cached (digits.py, its own small loop); train (loop.py); on digits, judge the final model
against its base (evaluate.py). Exit codes: 0 done, 2 bad input or settings.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import config as config_mod
import digits
import evaluate
import loop
import runtime


def run(overrides: dict | None = None, argv: list[str] | None = None) -> Path:
    """Resolve the config, set up (or join) torch.distributed, train; returns the output dir."""
    cfg = config_mod.resolve(overrides, argv)
    ctx = runtime.setup_distributed()
    try:
        if cfg.model == "digits" and not cfg.model_path and cfg.init == "pretrained":
            if ctx.rank == 0:
                digits.ensure_base(cfg.cache_dir, cfg.digits_base_steps, cfg.digits_corrupt)
            ctx.barrier()
        return loop.train(cfg, ctx)
    finally:
        ctx.teardown()


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
    try:
        with warnings.catch_warnings():  # ignored settings: one line each, from rank 0 only
            rank0 = int(os.environ.get("RANK", "0")) == 0
            warnings.simplefilter("always" if rank0 else "ignore", config_mod.IgnoredSettingWarning)
            warnings.showwarning = _one_line_for_settings(warnings.showwarning)
            out = run(argv=argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        cfg = json.loads((out / "config.json").read_text())
        if cfg["model"] == "digits" and (out / "final").exists():
            evaluate.report_digits_run(out)  # the independent judge: how well it follows prompts
        print(f"done: {out} (samples/, metrics.jsonl, checkpoints/, final/"
              f"{', eval.json' if (out / 'eval.json').exists() else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
