"""Training checkpoints, written atomically and read without unpickling anything.

out/checkpoints/step_XXXXXX/ holds trainable.safetensors (the trainable weights), state.safetensors
(every other tensor: optimizer moments, RNG states) and state.json (the structure of the training
state, numbers and strings, with keys into state.safetensors, plus the resolved config and the
files' sizes). Resume scans for the newest complete checkpoint and falls back past damaged ones.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import config as config_mod
import models
from models import sharding
from infra import export
from infra.runtime import Dist

# ---------------------------------------------------------------------------------------------
# Checkpoints: out/checkpoints/step_XXXXXX/{trainable.safetensors, state.safetensors, state.json}.
# Nothing is unpickled: state.json holds the training state's structure (numbers, strings, lists)
# with each tensor replaced by a key into state.safetensors, plus the byte size and CRC-32 of
# every file (a truncated copy, or one with flipped bits, is caught). Replay snapshots are files of out/replay, written once and named
# in state.json. Each checkpoint is written into a temporary directory and renamed into place,
# so a crash leaves the previous checkpoints and maybe the new one, never half of one. Resume
# scans the directory for the newest complete checkpoint (checkpoints/latest is informative only).
# ---------------------------------------------------------------------------------------------


def file_crc32(path: Path, chunk: int = 64 << 20) -> int:
    """CRC-32 (zlib) of a file's bytes, read in 64 MiB chunks: about 0.7 s per GB on one core, so
    a 3.4 GB SD-1.5 UNet state costs about 2.3 s to write and again to resume (tests/README.md)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


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


def save_checkpoint(out: Path, step: int, bundle, opt, lr_sched, scaler, pool, cfg, ctx: Dist, ema=None) -> None:
    ckdir = out / "checkpoints"
    # Under FSDP the weights and Adam moments are gathered first, a collective on every rank.
    sharded = sharding.is_sharded(bundle.unet)
    weights = bundle.trainable_state_dict() if ctx.rank == 0 or sharded else None
    optim = sharding.optimizer_state_dict(bundle.unet, opt) if sharded else opt.state_dict() if ctx.rank == 0 else None
    if ctx.rank == 0:
        final = ckdir / f"step_{step:06d}"
        tmp = ckdir / f".tmp_step_{step:06d}_{os.getpid()}"
        try:
            ckdir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
            if bundle.lora and bundle.family in export.ADAPTER_FAMILIES:  # load_lora_weights(step_N) works
                export.save_lora(weights, tmp, bundle.family)
            tensors: dict = {}
            tree = pack_state({"optimizer": optim, "lr_scheduler": lr_sched.state_dict(),
                               "scaler": scaler.state_dict(), "rng": _rng_state(),
                               "pool": pool.state_dict() if pool is not None else None,
                               "ema": ema.state_dict() if ema is not None else None}, tensors)
            save_file(tensors, str(tmp / "state.safetensors"))
            names = ("trainable.safetensors", "state.safetensors")
            sizes = {n: (tmp / n).stat().st_size for n in names}
            crcs = {n: file_crc32(tmp / n) for n in names}
            (tmp / "state.json").write_text(json.dumps({"format": 1, "step": step, "files": sizes, "crc32": crcs,
                                                        "state": tree, "config": config_mod.to_dict(cfg)}))
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
    truncated, damaged (its CRC-32 differs from the manifest's), labelled with another step than
    its folder's, or if a weight is not finite."""
    if not (d / "state.json").is_file():
        raise FileNotFoundError("no state.json (incomplete, or written by an older version)")
    manifest = json.loads((d / "state.json").read_text())
    if d.name.startswith("step_") and d.name[5:].isdigit() and manifest.get("step") != int(d.name[5:]):
        raise ValueError(f"state.json says step {manifest.get('step')!r}, the folder is {d.name}")
    for name, size in manifest["files"].items():
        got = (d / name).stat().st_size if (d / name).is_file() else None
        if got != size:
            raise ValueError(f"{name} is {'missing' if got is None else f'{got} bytes'}, expected {size} bytes")
    for name, crc in manifest.get("crc32", {}).items():  # absent in checkpoints of older versions
        if file_crc32(d / name) != crc:
            raise ValueError(f"{name} is damaged (its CRC-32 differs from the one in state.json)")
    weights = load_file(str(d / "trainable.safetensors"))
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{len(bad)} trainable tensor(s) hold NaN or inf, e.g. {bad[0]}")
    manifest["state"] = unpack_state(manifest["state"], load_file(str(d / "state.safetensors")))
    return weights, manifest


def step_number(which: str) -> int | None:
    """The step a checkpoint name spells: ``step_000004``, ``step_4``, diffusers' ``checkpoint-4``,
    ``4``, or a path ending in one of them; None if it spells none."""
    name = Path(which).name
    for prefix in ("step_", "checkpoint-", ""):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return int(name[len(prefix):])
    return None


def chosen_step(out: Path, which: str) -> int:
    """The step of checkpoint ``which`` (any spelling of ``step_number``)."""
    step = step_number(which)
    if step is None or not (Path(out) / "checkpoints" / f"step_{step:06d}").is_dir():
        have = sorted(p.name for p in (Path(out) / "checkpoints").glob("step_*"))
        raise FileNotFoundError(f"resume_from_checkpoint={which!r}: no such checkpoint in {Path(out) / 'checkpoints'} "
                                f"(have: {', '.join(have) or 'none'}; step_N, checkpoint-N or N)")
    return step


# Keys whose change breaks "a resumed run equals an uninterrupted one" (max_steps may grow).
TRAJECTORY_KEYS = ("method", "ssr", "replay", "model", "model_path", "data", "data_path", "beta",
                   "tau", "eps_clip", "replay_every", "loser_steps", "loser_guidance", "loser_scheduler",
                   "loser_every", "loser_batch", "batch_size",  # loser_batch: rounding of batched calls
                   "grad_accum", "lr", "warmup_steps", "lr_scheduler", "seed", "adam_epsilon", "use_8bit_adam", "use_ema",
                   "ema_decay", "lora_rank", "mixed_precision", "cfg_drop", "fsdp",  # fsdp: the optimizer state's layout
                   "adam_beta1", "adam_beta2", "weight_decay",  # the optimizer state's param_groups would override them
                   "weight_temperature", "resolution", "height", "width", "num_frames")
# The digits model and data: another base (a different frozen text encoder) or another data split.
DIGITS_KEYS = ("init", "digits_base_steps", "digits_corrupt", "digits_classes", "digits_align_per_class",
               "digits_loser_wrong", "pair_noise", "data_split")


def check_resume_config(saved: dict, now: dict) -> None:
    decaying = now.get("lr_scheduler") not in ("constant", "constant_with_warmup")  # reach their end at max_steps
    keys = TRAJECTORY_KEYS + (("max_steps",) if decaying else ()) + (DIGITS_KEYS if now.get("model") == "digits" else ())
    default = config_mod.to_dict(config_mod.Config())  # a key newer than the checkpoint had its default
    # K as it acted (replay_every 0, or a checkpoint older than it: save_every)
    saved = {**saved, "replay_every": saved.get("replay_every") or saved.get("save_every")}
    now = {**now, "replay_every": now.get("replay_every") or now.get("save_every")}
    diff = {k: (saved.get(k, default.get(k)), now.get(k)) for k in keys if saved.get(k, default.get(k)) != now.get(k)}
    if diff:
        raise ValueError("--resume with a config that changes the run: " + ", ".join(
            f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()) + "; use a new --out_dir instead")


def load_latest(out: Path, bundle, opt, lr_sched, scaler, pool, cfg, which: str = "latest", ema=None) -> int | None:
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
        if pool is not None and state["pool"] is not None:
            try:  # a lost or damaged snapshot is rebuilt from its checkpoint; never a fallback that
                pool.load_state_dict(state["pool"], rebuild=lambda s: _weights_of(out, s))  # rewrites newer checkpoints
            except (OSError, ValueError) as e:
                raise ValueError(f"resume: {d.name} is intact but its replay pool is not: {e}; restore "
                                 f"{Path(out) / 'replay'} (newer checkpoints are kept)") from e
        try:
            models.load_trainable(bundle, weights)
            if sharding.is_sharded(bundle.unet):  # a full state keyed by parameter name (fsdp is a trajectory key)
                sharding.load_optimizer_state_dict(bundle.unet, opt, state["optimizer"])
            else:
                opt.load_state_dict(state["optimizer"])
            lr_sched.load_state_dict(state["lr_scheduler"])
            scaler.load_state_dict(state["scaler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])  # use_ema is a trajectory key: the checkpoint has one
            _set_rng_state(state["rng"])
        except Exception as e:  # an older checkpoint, if usable, overwrites all of the above
            skipped.append(f"{d.name} ({type(e).__name__}: {e})")
            continue
        if skipped:
            print(f"warning: resume skipped damaged checkpoint(s): {'; '.join(skipped)}", flush=True)
        return int(manifest["step"])
    raise ValueError(f"resume: no usable checkpoint in {Path(out) / 'checkpoints'}: {'; '.join(skipped)}. "
                     f"Restore a checkpoint, or start afresh with --overwrite (this deletes the run)")


def _weights_of(out: Path, step: int) -> dict | None:
    """The verified trainable weights of checkpoint ``step``, or None if it is missing or damaged."""
    try:
        return read_checkpoint(Path(out) / "checkpoints" / f"step_{step:06d}")[0]
    except Exception:
        return None


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
