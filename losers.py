"""The losers of an update (SSPO family): sampled by the replayed reference checkpoint (Random
Checkpoint Replay, SSPO sec. 4.1) from per-pair initial noise, reused for the loser_every updates
of a cycle with that checkpoint as their reference, and sampled loser_batch pairs per call.
loop.update drives it; the training pass (loop.training_step) only reads ``x0_l_replayed``.
"""
from __future__ import annotations

import torch

import noise
import sampling


def loser_every(run) -> int:
    """Updates per loser-generation cycle: cfg.loser_every for the SSPO family, else 1."""
    return run.cfg.loser_every if run.loss_kind == "sspo" else 1


def loser_group(run) -> int:
    """Micro-batches whose losers one sampling call makes: cfg.loser_batch // batch_size for the
    SSPO family (at least one), else 1. The losers are those of one call per micro-batch (each
    pair's z_T is keyed by its dataset index) up to floating-point rounding, made with fewer,
    larger network calls."""
    if run.loss_kind != "sspo" or not run.cfg.loser_batch:
        return 1
    return max(1, run.cfg.loser_batch // run.cfg.batch_size)


def cycle_batch(run, stream, micro: int, gen_step: int, ref_idx: int | None) -> dict:
    """The micro-batch ``micro`` of this update: the next one from the stream, or (loser_every
    > 1 or loser_batch > batch_size) the cycle's cached batch with its replayed losers, sampled
    on first use together with those of the next loser_group - 1 micro-batches of the update."""
    if run.replayed is None:
        return next(stream)
    cycle = run.replayed
    if cycle["ref"] != ref_idx or run.loaded_ref != ref_idx:  # never score a loser with another checkpoint
        raise RuntimeError(f"replayed losers of update {gen_step} were made by checkpoint {cycle['ref']}, "
                           f"but the reference holds {run.loaded_ref}")
    if micro == len(cycle["batches"]):
        group = [next(stream) for _ in range(min(loser_group(run), run.cfg.grad_accum - micro))]
        made = replay_losers(run, group, gen_step)
        cycle["batches"] += [dict(b, x0_l_replayed=x0_l) for b, x0_l in zip(group, made)]
    batch = cycle["batches"][micro]
    if loser_every(run) == 1:  # used once: do not hold its pixels and losers until the next update
        cycle["batches"][micro] = None
    return batch


def replay_losers(run, batches: list[dict], step: int) -> list[torch.Tensor]:
    """x0_l (B_i,*shape) per batch: the reference checkpoint's samples for the batches' prompts
    (RCR, sec. 4.1), from the initial noise z_T keyed by (seed, ``step``, dataset index); all
    batches in one sampling call."""
    cfg = run.cfg
    z_T = torch.cat([noise.pair_noise(cfg.seed, step, b["index"], run.shape, run.noise)[2] for b in batches])
    prompts = [p for b in batches for p in b["prompt"]]
    with run.autocast():
        x0_l = sampling.sample(run.bundle, run.reference, prompts, latents=z_T.to(run.ctx.device),
                               latent_shape=run.shape, num_inference_steps=cfg.loser_steps,
                               guidance_scale=cfg.loser_guidance, scheduler=cfg.loser_scheduler)
    return list(x0_l.split([len(b["prompt"]) for b in batches]))
