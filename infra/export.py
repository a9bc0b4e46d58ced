"""What a run hands to a model user: LoRA adapters in diffusers' format, the final directory,
and a model card.

A LoRA run's ``final/`` holds ``pytorch_lora_weights.safetensors`` exactly as the pipeline's own
``save_lora_weights`` writes it (keys ``unet.<module>.lora.down/up.weight`` plus the peft config
as metadata), so that plain diffusers loads it onto the base model::

    pipe = StableDiffusionPipeline.from_pretrained(BASE)      # or AnimateDiff/SDXL/CogVideoX/WanPipeline
    pipe.load_lora_weights("RUN/final")

Every LoRA training checkpoint holds the same file beside ``trainable.safetensors`` (the
trainable weights under their peft parameter names), so ``load_lora_weights("RUN/checkpoints/step_N")``
works too; ``export_checkpoint`` turns any ``checkpoints/step_N``, LoRA or full, into what
``final/`` would hold at that step. A full
fine-tune's ``final/`` is the whole pipeline (models.save_model); with ``save_merged_pipeline``
a LoRA run also writes the merged pipeline to ``final/merged/``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

import models
from infra import runtime

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for


ADAPTER_FAMILIES = ("sd15", "animatediff", "sdxl", "cogvideox", "wan")  # whose pipelines load a LoRA file
# Their LoRA sits on a transformer: the file holds peft's own names under "transformer." (as the
# diffusers CogVideoX / Wan LoRA training scripts write it), not the UNet's "lora.down/up" names.
TRANSFORMER_FAMILIES = ("cogvideox", "wan")


def pipeline_class(family: str):
    import diffusers
    return getattr(diffusers, models.PIPELINE_CLASS[family])


def lora_layers(weights: dict, family: str = "sd15") -> dict[str, torch.Tensor]:
    """Trainable weights under peft names (``...to_q.lora_A.default.weight``, what
    ``Bundle.trainable_state_dict`` and checkpoints hold) -> diffusers' LoRA layer names
    (``...to_q.lora.down.weight``), without the ``unet.`` prefix that save_lora_weights adds.
    Raises ValueError when the weights hold no LoRA tensors (a full fine-tune's checkpoint)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    peft = {k.replace(".default.", "."): v.detach().cpu().contiguous() for k, v in weights.items()
            if ".lora_A.default." in k or ".lora_B.default." in k}
    if not peft:
        raise ValueError(f"no LoRA weights among {len(weights)} tensors (e.g. {sorted(weights)[:1]}): "
                         f"this is not a LoRA run's checkpoint")
    return peft if family in TRANSFORMER_FAMILIES else convert_state_dict_to_diffusers(peft)


def save_lora(weights: dict, path, family: str) -> Path:
    """Write ``path/pytorch_lora_weights.safetensors`` with the pipeline's ``save_lora_weights``
    (the rank is read off the weights; alpha = rank and the targets are models.lora_config's)."""
    layers = lora_layers(weights, family)
    rank = next(v.shape[0] for k, v in layers.items() if k.endswith(("lora.down.weight", "lora_A.weight")))
    meta = models.lora_config(rank).to_dict()
    part = "transformer" if family in TRANSFORMER_FAMILIES else "unet"
    pipeline_class(family).save_lora_weights(str(path), weight_name=LORA_FILE, safe_serialization=True,
                                             **{f"{part}_lora_layers": layers, f"{part}_lora_adapter_metadata": meta})
    return Path(path) / LORA_FILE


def export_checkpoint(step_dir, out, family: str | None = None) -> Path:
    """``checkpoints/step_N`` -> what ``final/`` would hold at that step: a LoRA run's
    ``out/pytorch_lora_weights.safetensors`` (returned), or, for a full (or motion-module) fine-tune,
    the run's base model with the checkpoint's weights in the full pipeline layout
    (``models.save_model``; ``out`` returned). The family and base default to the run's
    config.json (two levels up)."""
    step_dir = Path(step_dir)
    f = step_dir / "trainable.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: expected a checkpoints/step_N directory of a run")
    cfg = run_config(step_dir)
    family = family or cfg["model"]
    weights = load_file(str(f))
    if any(".lora_A." in k for k in weights):
        return save_lora(weights, out, family)
    from infra import builders
    import config as config_mod
    run_cfg = config_mod.Config(**{k: v for k, v in cfg.items() if k in config_mod.Config.__dataclass_fields__})
    run_cfg.model, run_cfg.lora_rank, run_cfg.gradient_checkpointing = family, 0, False
    bundle = builders.build_bundle(run_cfg)
    models.load_trainable(bundle, weights)
    models.save_model(bundle, str(out))
    return Path(out)


def run_config(path) -> dict:
    """config.json of the run that ``path`` (the run dir, final/, checkpoints/step_N) belongs to."""
    for d in (Path(path), *Path(path).resolve().parents[:3]):
        if (d / "config.json").is_file():
            return json.loads((d / "config.json").read_text())
    raise FileNotFoundError(f"no config.json of a run found at or above {path}")


def _as_released(cfg, bundle: models.Bundle) -> models.Bundle:
    """The base model as released (every module in the dtype its files hold) with the run's
    trained weights loaded in. Under mixed precision the run held its frozen modules in the
    autocast dtype (``models.cast_frozen``); a saved pipeline takes them from the base instead, so
    final/ loses nothing to that rounding and a merged LoRA is fused into the full-precision base."""
    from infra import builders
    fresh = builders.build_bundle(dataclasses.replace(cfg, gradient_checkpointing=False))
    models.load_trainable(fresh, bundle.trainable_state_dict())
    return fresh


def write_final(cfg, bundle: models.Bundle, out: Path, step: int) -> Path:
    """``out/final``, written into ``final.tmp`` and renamed: a LoRA run of ADAPTER_FAMILIES gets
    the adapter (and, with ``save_merged_pipeline``, the merged pipeline in ``merged/``); every
    other run the full model in diffusers' layout. Then the model card."""
    tmp, final = out / "final.tmp", out / "final"
    shutil.rmtree(tmp, ignore_errors=True)
    if runtime.autocast_dtype(cfg) is not None and not (bundle.lora and bundle.family in ADAPTER_FAMILIES
                                                        and not cfg.save_merged_pipeline):
        bundle = _as_released(cfg, bundle)
    if bundle.lora and bundle.family in ADAPTER_FAMILIES:
        save_lora(bundle.trainable_state_dict(), tmp, bundle.family)
        if cfg.save_merged_pipeline:
            models.save_model(bundle, tmp / "merged")
    else:
        models.save_model(bundle, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_model_card(out, step)
    return final


# ----------------------------------------------------------------------------- model card

_BASE = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "animatediff": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
_METHOD = {"sft": "supervised fine-tuning on the preferred samples",
           "dpo": "Diffusion-DPO (Wallace et al., 2023)",
           "spin": "SPIN-Diffusion (Yuan et al., 2024)",
           "sspo": "SSPO, Self-Sampling Preference Optimization (arXiv 2410.05255)",
           "sspo_r": "SSPO with random winners (ablation SSPOr, arXiv 2410.05255)",
           "dpo_cm": "DPO-C&M, importance-sampled Diffusion-DPO with clipping and masking (arXiv 2505.21893)",
           "sdpo": "SDPO, importance-sampled Diffusion-DPO (arXiv 2505.21893)"}


def _frame(cfg: dict) -> str:
    """"512", or "480x720 (height x width)" for a non-square run (configs before height/width: square)."""
    h, w = cfg.get("height") or cfg["resolution"], cfg.get("width") or cfg["resolution"]
    return str(h) if h == w else f"{h}x{w} (height x width)"


PROCESSES_FILE = "processes.json"  # in the run directory: the world size of each (re)start


def record_processes(out: Path, step: int, world: int) -> None:
    """Record that the run (re)starts at update ``step`` on ``world`` processes, in
    out/processes.json: [{"step": s, "world_size": w}, ...], a row per start that changed the
    world size (a resume drops the rows after its checkpoint, whose updates are redone). The
    model card's global batch reads it; config.json holds only per-process settings."""
    path = Path(out) / PROCESSES_FILE
    rows = json.loads(path.read_text()) if step and path.is_file() else []
    rows = [r for r in rows if r["step"] < step] if step else []
    if not rows or rows[-1]["world_size"] != world:
        rows.append({"step": step, "world_size": world})
    runtime.write_json(path, rows)


def _global_batch(cfg: dict, processes: list | None) -> str:
    """"4 x 2 accumulation x 8 processes = 64 samples per update" (pairs for preference methods),
    a term per world size when a resume changed it; the world size unknown for runs without
    processes.json."""
    per = cfg["batch_size"] * cfg["grad_accum"]
    head = f"{cfg['batch_size']} x {cfg['grad_accum']} accumulation"
    if not processes:
        return f"{head} x (process count not recorded)"
    return ", ".join(f"{head} x {r['world_size']} process{'es' if r['world_size'] > 1 else ''} = "
                     f"{per * r['world_size']}" + (f" from update {r['step'] + 1}" if len(processes) > 1 else "")
                     for r in processes)


def model_card(cfg: dict, step: int, evaluation: dict | None = None, processes: list | None = None) -> str:
    """A diffusers-style README.md: YAML header (base_model, tags) and what was trained how."""
    base = cfg.get("model_path") or _BASE.get(cfg["model"], "the embedded digits base model")
    lora = cfg["lora_rank"] > 0 and cfg["model"] in ADAPTER_FAMILIES
    tags = ["diffusers", "text-to-video" if cfg["model"] in ("animatediff", "cogvideox", "wan") else "text-to-image",
            cfg["method"], "lora" if lora else "full-fine-tune"]
    head = ["---", f"base_model: {base}", "library_name: diffusers", "tags:", *[f"- {t}" for t in tags], "---"]
    pipe = models.PIPELINE_CLASS.get(cfg["model"], "DiffusionPipeline")
    lines = [f"# {cfg['method']} on {cfg['model']} / {cfg['data']}", "",
             f"Fine-tuned from `{base}` with {_METHOD.get(cfg['method'], cfg['method'])}.", "",
             "| setting | value |", "|---|---|",
             f"| method | {cfg['method']} |", f"| beta | {cfg['beta']:g} |", f"| updates | {step} |",
             f"| batch per device | {cfg['batch_size']} x {cfg['grad_accum']} accumulation steps |",
             f"| global batch ({'pairs' if cfg['method'] != 'sft' else 'samples'} per update) | "
             f"{_global_batch(cfg, processes)} |",
             f"| learning rate | {cfg['lr']:g} ({cfg.get('lr_scheduler', 'constant_with_warmup')}, "
             f"{cfg['warmup_steps']} warm-up) |",
             f"| trained weights | {'LoRA rank ' + str(cfg['lora_rank']) if cfg['lora_rank'] else 'full UNet'} |",
             f"| data | {cfg['data']} at `{cfg['data_path'] or '(embedded)'}` |",
             f"| resolution | {_frame(cfg)} |", f"| mixed precision | {cfg['mixed_precision']} |",
             f"| seed | {cfg['seed']} |"]
    if cfg["method"] in ("sspo", "sspo_r", "spin"):
        lines.append(f"| replay | {cfg['replay']}, checkpoint interval {cfg.get('replay_every') or cfg['save_every']}, SSR {cfg['ssr']} |")
    if cfg["method"] in ("dpo_cm", "sdpo"):
        lines.append(f"| importance weights | tau {cfg['tau']:g}, eps_clip {cfg['eps_clip']:g} |")
    if lora:
        lines += ["", "## Use", "", "```python", f"from diffusers import {pipe}",
                  f"pipe = {pipe}.from_pretrained(\"{base}\")", "pipe.load_lora_weights(\"path/to/this/folder\")",
                  "```"]
    elif cfg["model"] != "digits":
        lines += ["", "## Use", "", "```python", f"from diffusers import {pipe}",
                  f"pipe = {pipe}.from_pretrained(\"path/to/this/folder\")", "```"]
    if evaluation:
        lines += ["", "## Evaluation", "", "```json", json.dumps(evaluation, indent=1), "```"]
    return "\n".join(head + [""] + lines) + "\n"


def write_model_card(run_dir, step: int | None = None) -> Path | None:
    """The model card (README.md in the run's final folder) from config.json and, when present, eval.json (rewritten after an
    evaluation so the card carries its numbers). None if the run has no final/."""
    run_dir = Path(run_dir)
    if not (run_dir / "final").is_dir():
        return None
    cfg = json.loads((run_dir / "config.json").read_text())
    ev = run_dir / "eval.json"
    procs = run_dir / PROCESSES_FILE
    card = model_card(cfg, cfg["max_steps"] if step is None else step,
                      json.loads(ev.read_text()) if ev.is_file() else None,
                      json.loads(procs.read_text()) if procs.is_file() else None)
    grids = sorted((run_dir / "samples").glob("step_*.png")) if (run_dir / "samples").is_dir() else []
    if grids:  # the last sample grid, each prompt under its image
        shutil.copyfile(grids[-1], run_dir / "final" / "samples.png")
        card += f"\n## Samples\n\n![samples at {grids[-1].stem}](samples.png)\n"
    path = run_dir / "final" / "README.md"
    path.write_text(card)
    # diffusers' own card helpers: read back (locally, the path exists) and completed as its scripts do
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
    populate_model_card(load_or_create_model_card(str(path)), tags=[]).save(path)
    return path
