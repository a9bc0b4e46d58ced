"""Experiment trackers for ``report_to`` (the diffusers scripts' name): none | tensorboard | wandb.

Imported lazily, so neither package is needed unless chosen (config.validate names the missing
one in one line). Rank 0 only: ``runtime.Logger`` owns the tracker and hands it every row it
writes to metrics.jsonl and every sample grid.

    tensorboard --logdir RUN/logs          # curves under train/ (and `loss`, the diffusers DPO script's tag), grids under validation/
    WANDB_MODE=offline python train.py ... --report_to=wandb    # then: wandb sync RUN/wandb/offline-run-*
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class TensorBoard:
    """Scalars as ``train/<name>`` (the loss also as ``loss``, as the diffusers DPO script logs it),
    images as ``validation/<name>``, in ``out/logs``. A resumed run opens its writer with
    ``purge_step`` = the first step it logs again, so the earlier run's later points are hidden."""

    def __init__(self, out: Path, config: dict, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("report_to=tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(Path(out) / "logs"), purge_step=purge_step)
        if purge_step is None:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def log(self, row: dict, step: int) -> None:
        for k, v in row.items():
            if k not in ("step", "time"):
                self.writer.add_scalar(f"train/{k}", float(v), step)
        if "loss" in row:
            self.writer.add_scalar("loss", float(row["loss"]), step)
        self.writer.flush()

    def image(self, name: str, image, step: int) -> None:
        self.writer.add_image(f"validation/{name}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One wandb run in ``out/wandb``; honours WANDB_MODE (offline needs no account or network)."""

    def __init__(self, out: Path, config: dict, project: str = "sspo"):
        try:
            import wandb
        except ImportError:
            raise ValueError("report_to=wandb needs the wandb package: pip install wandb") from None
        self.wandb = wandb
        Path(out).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=Path(out).name, dir=str(out), config=config)

    def log(self, row: dict, step: int) -> None:
        self.run.log({f"train/{k}": v for k, v in row.items() if k not in ("step", "time")}, step=step)

    def image(self, name: str, image, step: int) -> None:
        self.run.log({f"validation/{name}": self.wandb.Image(image, caption=f"step {step}")}, step=step)

    def close(self) -> None:
        self.run.finish()


def make(report_to: str, out: Path, config: dict, project: str = "sspo", purge_step: int | None = None):
    """The tracker for ``report_to``, or None for "none"; ``purge_step``: a resumed run's first step."""
    if report_to == "tensorboard":
        return TensorBoard(out, config, purge_step)
    if report_to == "wandb":
        return WandB(out, config, project)
    if report_to != "none":
        raise ValueError(f"report_to must be none | tensorboard | wandb, got {report_to!r}")
    return None
