"""The training loop: SFT, Diffusion-DPO, SPIN-Diffusion, SSPO (and its ablations, SSPOr),
DPO-C&M and SDPO, for every model family, on one process or one rank of a torchrun job.

One SSPO update ([SSPO] Algorithm 1 / DESIGN.md "One SSPO step, as data"):
  1. a batch of prompts and winners x0_w (B items) from data.py / digits.py;
  2. replay.py picks a checkpoint from the pool (uniform = Random Checkpoint Replay), loads it
     into the reference network, and sampling.py samples x0_l for the same prompts with it,
     in latent space;
  3. [x0_w; x0_l] (2B) share one (t, eps) per pair; the reference runs once on 2B without grad,
     the policy once on 2B with grad;
  4. sspo.py turns the four per-sample errors into per-sample losses (eq. 8-9).
``train`` reads top to bottom: ``setup`` (model, data, optimizer, pool), ``start`` (resume or
begin), ``update`` per optimizer step, ``finish``. Files, logging and signals live in runtime.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import builders
import checkpoints
import config as config_mod
import data
import export
import models
import noise
import replay
import runtime
import sharding
import importance
import losers
import sspo
from config import LOSS_OF, Config

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Building blocks: the run directory, messages
# ---------------------------------------------------------------------------------------------


def prepare_out_dir(cfg: Config, ctx: runtime.Dist) -> None:
    """A fresh run never mixes with an old one in the same directory: refuse, or clear it when
    ``overwrite`` is set (the digits preset does, so the README's command can be re-run)."""
    out = Path(cfg.out_dir)
    if cfg.resume or not (out / "checkpoints").exists() and not (out / "final").exists():
        return
    if not cfg.overwrite:
        raise ValueError(f"out_dir {out} already holds a run; pass --resume to continue it, "
                         f"--overwrite to start over, or another --out_dir")
    if ctx.rank == 0:
        for name in ("checkpoints", "final", "samples", "replay", "logs", "wandb", "metrics.jsonl", "eval.json"):
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    ctx.barrier()


def _nonfinite_message(what: str, step: int, cfg: Config, out: Path) -> str:
    last = checkpoints.latest_step(out)
    where = f"step {last}" if last is not None else "none (no checkpoint yet)"
    return (f"non-finite {what} at update {step} ({cfg.method}, lr {cfg.lr}, beta {cfg.beta}); "
            f"stopping. The last good checkpoint is {where} in {out / 'checkpoints'}; "
            f"try a lower lr, mixed_precision=no, or check the data.")


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one training run holds between updates."""
    cfg: Config
    ctx: runtime.Dist
    out: Path
    bundle: models.Bundle
    policy: torch.nn.Module            # the UNet, DDP-wrapped when world > 1 (sharded in place with fsdp)
    reference: replay.Reference | None  # None for SFT
    pool: replay.CheckpointPool | None
    opt: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: object                   # () -> context manager
    noise: noise.Process               # DDPM (eps / v) or flow matching, from the scheduler config
    shape: tuple                       # one x0 in diffusion space
    loss_kind: str                     # sft | dpo | sspo | dpo_cm | sdpo
    loader: torch.utils.data.DataLoader
    sampler: data.ResumableDistributedSampler
    dataset: builders.Indexed
    batches_per_epoch: int
    params: list
    logger: runtime.Logger
    loaded_ref: int | None = None      # which pool entry the reference holds now
    replayed: dict | None = None       # loser_every or loser_group > 1: {"step", "ref", "batches"} of this cycle


def setup(cfg: Config, ctx: runtime.Dist) -> Run:
    """Model on the device, data, optimizer, reference and replay pool."""
    out, device = Path(cfg.out_dir), ctx.device
    torch.manual_seed(cfg.seed)
    loss_kind = LOSS_OF[cfg.method]
    preference = loss_kind != "sft"
    prepare_out_dir(cfg, ctx)
    if cfg.fsdp and ctx.world == 1:
        raise ValueError("fsdp shards the model across the processes of a torchrun job; "
                         "with one process, train without --fsdp")
    dataset = builders.Indexed(builders.build_dataset(cfg))  # before the model: a bad data path fails fast
    bundle = builders.build_bundle(cfg)
    for m in (None if cfg.fsdp else bundle.unet, bundle.text_encoder, bundle.text_encoder_2, bundle.vae):
        if m is not None:
            m.to(device)  # fsdp: fully_shard moves each rank's shards of the transformer to the device

    sampler = data.ResumableDistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank,
                                               shuffle=True, seed=cfg.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                         collate_fn=data.collate, drop_last=True,
                                         num_workers=cfg.num_workers)  # "index" -> (B,) long
    batches_per_epoch = sampler.num_samples // cfg.batch_size
    if batches_per_epoch < 1:
        raise ValueError(f"dataset of {len(dataset)} items is smaller than one global batch "
                         f"({cfg.batch_size} x {ctx.world} processes)")

    # Built before DDP / FSDP: with LoRA the reference is a second adapter on the same UNet.
    reference = replay.Reference(bundle) if preference else None
    if cfg.fsdp:  # FSDP2 instead of DDP: the policy and its frozen reference copy, sharded alike
        sharding.shard(bundle.unet, cfg.model, device)
        if reference is not None:
            sharding.shard(reference.unet, cfg.model, device)
    params = bundle.trainable_parameters()  # after sharding, which replaces the Parameters
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    # diffusers' schedules (a LambdaLR whose state_dict holds no lambdas, so checkpoints stay data)
    from diffusers.optimization import get_scheduler
    lr_sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    # DDP wraps the trainable module only; the reference is never wrapped.
    policy = DDP(bundle.unet, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.world > 1 and not cfg.fsdp else bundle.unet
    # The pool of replayable checkpoints: RCR for the SSPO family; for DPO-style methods it only
    # holds checkpoint 0, the fixed initial reference; SFT needs no reference at all.
    pool = replay.CheckpointPool(strategy=cfg.replay if loss_kind == "sspo" else "initial",
                                 seed=cfg.seed, storage=cfg.pool_storage,
                                 directory=str((out / "replay").resolve())) if preference else None
    return Run(cfg, ctx, out, bundle, policy, reference, pool, opt, lr_sched,
               torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16"), autocast,
               noise.Process.from_config(bundle.scheduler_config, device),
               models.latent_shape(bundle, config_mod.frame_size(cfg), cfg.num_frames), loss_kind, loader, sampler,
               dataset, batches_per_epoch, params, runtime.Logger(cfg, ctx, out))


def start(run: Run) -> int:
    """Resume from the latest checkpoint, or begin: config.json, checkpoint 0, first samples."""
    cfg, ctx, out = run.cfg, run.ctx, run.out
    resumed = checkpoints.load_latest(out, run.bundle, run.opt, run.lr_sched, run.scaler, run.pool, cfg,
                                  cfg.resume_from_checkpoint or "latest") if cfg.resume else None
    if resumed is not None:
        if ctx.rank == 0:
            checkpoints.truncate_metrics(out, resumed)  # rows after the checkpoint are logged again
        run.logger.info(f"resumed from step {resumed}")
    else:
        if ctx.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            runtime.write_json(out / "config.json", config_mod.to_dict(cfg))
        if run.pool is not None:
            run.pool.add(run.bundle.trainable_state_dict(), 0)  # checkpoint 0 = the initial model
        if cfg.sample_every:
            run.logger.samples(run.bundle, 0, run.shape)  # the starting point, for comparison
    ctx.barrier()
    run.logger.info(f"{cfg.method} on {cfg.model}/{cfg.data}: {len(run.dataset)} items, global batch "
                    f"{cfg.batch_size} x {cfg.grad_accum} accum x {ctx.world} procs = "
                    f"{cfg.batch_size * cfg.grad_accum * ctx.world}, {len(run.params)} trainable tensors "
                    f"({sum(p.numel() for p in run.params) / 1e6:.2f}M params)")
    return resumed or 0


def batches(run: Run, step: int):
    """Batches from update ``step`` on, resuming mid-epoch exactly where that update began
    (with loser_every = k, the updates of one cycle share its batches: the stream moves once
    per cycle, and a resume inside a cycle starts at the cycle's first batch)."""
    epoch, within = divmod(step // losers.loser_every(run) * run.cfg.grad_accum, run.batches_per_epoch)
    while True:
        run.sampler.set_epoch(epoch, start=within * run.cfg.batch_size)
        run.dataset.set_epoch(epoch)
        skipped = 0
        for b in run.loader:
            skipped += b["num_skipped"]
            if b["prompt"]:  # an all-unreadable batch (every item skipped and counted) is passed over
                yield b
        if skipped:
            log.warning("epoch %d: %d unreadable items skipped on rank %d", epoch, skipped, run.ctx.rank)
        epoch, within = epoch + 1, 0


def update(run: Run, stream, step: int, stop: runtime.StopOnSignal) -> dict | None:
    """One optimizer update (grad_accum micro-steps). Returns its metrics, or None when a
    SIGTERM arrived between micro-steps (the partial gradient is dropped).

    Loser reuse (cfg.loser_every = k > 1, SSPO family): updates come in cycles of k. The
    cycle's first update ``gen_step`` draws the reference checkpoint c = pool.choose(gen_step),
    takes fresh batches and samples their losers with c; the next k-1 updates retrain on those
    same (prompt, winner, loser) pairs with fresh (t, eps), and c stays their reference, so every
    pair is scored by the checkpoint that made its loser (RCR holds). The pool only grows at
    multiples of save_every, which config.validate makes a multiple of k, so c is a function of
    gen_step alone and a resume inside a cycle regenerates the very same losers.

    Batched sampling (cfg.loser_batch = g * batch_size, g > 1): the losers of g micro-batches of
    the update are sampled in one call when the first of them is reached (the losers of one call
    each, up to floating-point rounding, in fewer and larger network calls; the batches are taken
    from the stream in the same order, only earlier)."""
    cfg, ctx = run.cfg, run.ctx
    every = losers.loser_every(run)
    gen_step = step - step % every  # the update whose checkpoint and z_T make this update's losers
    ref_idx = run.pool.choose(gen_step) if run.pool is not None else None
    if ref_idx is not None and ref_idx != run.loaded_ref:
        run.reference.load(run.pool.get(ref_idx))  # in place: one reference module, or a LoRA adapter
        run.loaded_ref = ref_idx
    if every == 1 and losers.loser_group(run) == 1:
        run.replayed = None
    elif run.replayed is None or run.replayed["step"] != gen_step:
        run.replayed = {"step": gen_step, "ref": ref_idx, "batches": []}  # a new cycle
    sums: dict[str, torch.Tensor] = {}
    for micro in range(cfg.grad_accum):
        if micro and ctx.any_flag(stop.requested):
            run.opt.zero_grad(set_to_none=True)
            return None
        sync = micro == cfg.grad_accum - 1
        # DDP all-reduces on the last micro-step only; FSDP reduce-scatters every micro-step
        with (contextlib.nullcontext() if sync or ctx.world == 1 or cfg.fsdp else run.policy.no_sync()):
            loss, metrics = training_step(run, losers.cycle_batch(run, stream, micro, gen_step, ref_idx), step)
            run.scaler.scale(loss / cfg.grad_accum).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.detach() / cfg.grad_accum
    if not ctx.all_finite(sums["loss"]):
        raise FloatingPointError(_nonfinite_message("loss", step, cfg, run.out))
    run.scaler.unscale_(run.opt)
    grad_norm = sharding.full_tensor(torch.nn.utils.clip_grad_norm_(  # FSDP: a replicated DTensor
        run.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
    # fp16's GradScaler skips steps with inf/NaN gradients by design; otherwise a non-finite
    # gradient would poison the weights, the replay pool and the next checkpoint.
    if not run.scaler.is_enabled() and not ctx.all_finite(grad_norm):
        raise FloatingPointError(_nonfinite_message("gradient", step, cfg, run.out))
    sums["grad_norm"] = grad_norm.detach()
    sums["lr"] = torch.tensor(run.lr_sched.get_last_lr()[0])  # the rate this update uses
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    run.lr_sched.step()
    if ref_idx is not None:
        sums["ref_checkpoint"] = torch.tensor(float(ref_idx))
    return sums


def training_step(run: Run, batch: dict, step: int):
    """Loss of one micro-batch; returns (scalar loss, metrics of detached 0-d tensors)."""
    cfg, bundle, device, autocast = run.cfg, run.bundle, run.ctx.device, run.autocast
    prompts, kind = batch["prompt"], run.loss_kind
    with torch.no_grad(), autocast():
        # float32 from here on: under bf16 autocast the VAE returns bf16 latents, and a bf16
        # schedule rounds abar_t to 1 at small t (no noise added at all).
        x0_w = models.encode_pixels(bundle, batch["x0_w"].to(device),  # (B,*shape)
                                    noise.vae_generators(cfg.seed, step, batch["index"], 1)).float()
        text, extra = models.encode_prompts(bundle, prompts, return_extra=True)  # (B,77,D), SDXL: text_embeds
    extra_w, extra_l = models.image_conditions(bundle, batch, extra)
    t, eps = (v.to(device) for v in noise.pair_noise(cfg.seed, step, batch["index"], run.shape, run.noise)[:2])
    if kind == "sft":
        x0, t2, eps2, text2, extra2 = x0_w, t, eps, text, extra_w
    else:
        if kind == "sspo":  # the replayed checkpoint samples the "losers" (RCR, sec. 4.1)
            x0_l = batch.get("x0_l_replayed")  # given by losers.cycle_batch (loser_every / loser_batch)
            if x0_l is None:
                x0_l = losers.replay_losers(run, [batch], step)[0]
        else:  # a preference pair from the data set
            with torch.no_grad(), autocast():
                x0_l = models.encode_pixels(bundle, batch["x0_l"].to(device),
                                            noise.vae_generators(cfg.seed, step, batch["index"], 2))
        x0 = torch.cat([x0_w, x0_l.float()])  # [winners; losers]: (2B,*shape)
        t2, eps2, text2 = torch.cat([t, t]), torch.cat([eps, eps]), torch.cat([text, text])
        extra2 = models.cat_extra(extra_w, extra_l)  # SDXL: each image's own time_ids
    x_t = run.noise.q_sample(x0, t2, eps2)
    target = run.noise.target(x0, eps2, t2)  # eps, v, or the flow velocity eps - x0
    t_in = run.noise.model_t(t2)  # the network's timestep: t, or T * sigma_t for flows
    if kind != "sft":
        with torch.no_grad(), autocast():
            ref_pred = run.reference(x_t, t_in, text2, extra2)
        r_w, r_l = sspo.per_sample_error(ref_pred, target).chunk(2)  # (2B,) -> (B,), (B,)
    with autocast():
        pred = models.unet_forward(bundle, run.policy, x_t, t_in, text2, extra2)
    err = sspo.per_sample_error(pred, target)  # (2B,) float32 (or (B,) for SFT)
    if kind == "sft":
        losses, metrics = sspo.sft_loss(err)
    else:
        m_w, m_l = err.chunk(2)  # (2B,) -> (B,), (B,)
        if kind == "dpo":
            losses, metrics = sspo.dpo_loss(m_w, m_l, r_w, r_l, beta=cfg.beta)
        elif kind == "sspo":
            losses, metrics = sspo.sspo_loss(m_w, m_l, r_w, r_l, beta=cfg.beta, ssr=cfg.ssr)
        else:
            log_w = run.noise.pair_log_weight(m_w, m_l, r_w, r_l, t, num_values=target[0].numel())
            fn = importance.dpo_cm_loss if kind == "dpo_cm" else importance.sdpo_loss
            losses, metrics = fn(m_w, m_l, r_w, r_l, log_w, beta=cfg.beta, tau=cfg.tau, eps_clip=cfg.eps_clip)
    loss = losses.mean()
    metrics["loss"] = loss.detach()
    return loss, metrics


def finish(run: Run, step: int) -> None:
    """A finished run's model (export.write_final: diffusers' layout, or the LoRA adapter in
    diffusers' format), written atomically, with a model card; its last samples."""
    cfg, out = run.cfg, run.out
    bundle = run.bundle
    if step >= cfg.max_steps and sharding.is_sharded(bundle.unet):  # gathered: rank 0 writes a plain model
        bundle = dataclasses.replace(bundle, unet=sharding.plain_copy(bundle.unet))
    if step >= cfg.max_steps and run.ctx.rank == 0:
        export.write_final(cfg, bundle, out, step)
        if not cfg.sample_every or step % cfg.sample_every:
            run.logger.samples(bundle, step, run.shape)
    run.logger.close()
    run.ctx.barrier()


def train(cfg: Config, ctx: runtime.Dist) -> Path:
    """Train until max_steps and return the output dir; on SIGTERM save and raise Preempted."""
    run = setup(cfg, ctx)
    step = start(run)
    stream = batches(run, step)
    stop = runtime.StopOnSignal()
    run.bundle.unet.train()
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            metrics = update(run, stream, step, stop)
            if metrics is not None:
                step += 1
                lr = float(metrics.pop("lr"))
                run.logger.step(step, metrics, lr, time.perf_counter() - t0)
            stopping = metrics is None or ctx.any_flag(stop.requested)
            if step % cfg.save_every == 0 and metrics is not None and run.loss_kind == "sspo":
                run.pool.add(run.bundle.trainable_state_dict(), step)
            if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
                checkpoints.save_checkpoint(run.out, step, run.bundle, run.opt, run.lr_sched, run.scaler,
                                        run.pool, cfg, ctx)
            if cfg.sample_every and step % cfg.sample_every == 0 and metrics is not None:
                run.logger.samples(run.bundle, step, run.shape)
            if stopping:
                break
    finally:
        stop.restore()
    finish(run, step)
    if step < cfg.max_steps:
        raise runtime.Preempted(step)  # train.py: exit code 143, never "done:"
    return run.out
