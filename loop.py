"""The training loop: SFT, Diffusion-DPO, SPIN-Diffusion, SSPO (and its ablations, SSPOr),
DPO-C&M and SDPO, for every model family, on one process or one rank of a torchrun job.
train.py runs the outer loop of Algorithm 1; this module holds what it calls: ``setup`` (model,
data, optimizer, pool), ``start`` (resume or begin), ``update`` per optimizer step (grad_accum
micro-steps of ``training_step``), ``finish``. Files, logging and signals live in infra/.

One SSPO micro-step as data (SSPO Algorithm 1 and sec. 4.1), B pairs, diffusion-space shape S
(C,H,W for images, C,F,H,W for videos):

    batch = run.losers.next_batch(stream, micro)     # replay.Losers, after run.losers.begin(step):
      prompt  list of B strings                      #   from data/ or digits/
      x0_w    (B,*pixels)  winners                   #   from data/ or digits/
      index   (B,) long    dataset indices           #   keys every random draw below
      x0_l    (B,*S)       losers, sampled by the checkpoint k = pool.choose(step) drawn
                           from the run's own pool (Random Checkpoint Replay), now loaded
                           in run.reference; for Diffusion-DPO/DPO-C&M/SDPO the data's loser
                           (pixels), for SFT absent
    x0_w    = encode_pixels(x0_w)                    (B,*S)   (VAE; identity for digits)
    t, eps  = noise.pair_noise(seed, step, index)    (B,), (B,*S): one per pair, keyed
    x0      = [x0_w; x0_l]                           (2B,*S)  winners first
    x_t     = q_sample(x0, [t; t], [eps; eps])       (2B,*S)
    target  = eps, v, or the flow velocity           (2B,*S)
    r_w, r_l = per_sample_error(reference(x_t), target).chunk(2)   (B,), (B,)  no grad
    m_w, m_l = per_sample_error(policy(x_t), target).chunk(2)      (B,), (B,)  with grad
    loss    = sspo.sspo_loss(m_w, m_l, r_w, r_l, beta, ssr).mean() eq. 8-9

Other methods change only the losers (above) and the last line (``config.METHODS`` says which).
SDPO adds a gradient-free first pass over the update's micro-batches (``sdpo_normaliser``): its
pair weights' normaliser spans every micro-batch and process of the update.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import config as config_mod
import data
import importance
import models
import noise
import replay
import sspo
from config import METHODS, Config, Method
from infra import builders, checkpoints, export, runtime
from models import sharding

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Building blocks: the run directory, messages
# ---------------------------------------------------------------------------------------------


def prepare_out_dir(cfg: Config, ctx: runtime.Dist) -> None:
    """Take the run directory for this run: rank 0 locks out_dir/.lock for the whole run (a second
    writer, --resume and overwrite included, is refused in one line and changes nothing), sweeps
    the temporary files of writes a killed run left, and a fresh run never mixes with an old one
    in the same directory: refuse, or clear it when ``overwrite`` is set (the digits preset does,
    so the README's command can be re-run)."""
    out = Path(cfg.out_dir)
    if cfg.mixed_precision == "fp16" and ctx.device.type != "cuda":
        raise ValueError("mixed_precision=fp16 needs a GPU: on the CPU its GradScaler skips every update; "
                         "use --mixed_precision=bf16 or --mixed_precision=no")
    refused = None
    if ctx.rank == 0:
        try:
            runtime.lock_run_dir(out)
        except ValueError as e:
            refused = e
    if ctx.any_flag(refused is not None):
        raise refused or ValueError(f"out_dir {out} is in use by another run (rank 0 says why)")
    if ctx.rank == 0:
        _sweep_temporaries(out)
    if cfg.resume or not (out / "checkpoints").exists() and not (out / "final").exists():
        ctx.barrier()
        return
    if not cfg.overwrite:
        raise ValueError(f"out_dir {out} already holds a run; pass --resume to continue it, "
                         f"--overwrite to start over, or another --out_dir")
    if ctx.rank == 0:
        for name in ("checkpoints", "final", "samples", "replay", "logs", "wandb", "metrics.jsonl", "eval.json",
                     export.PROCESSES_FILE):
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    ctx.barrier()


def _sweep_temporaries(out: Path) -> None:
    """Delete what interrupted atomic writes leave behind (a killed run never renamed them):
    checkpoints/.tmp_step_*, checkpoints/latest.tmp, replay/*.tmp, final.tmp, out/*.tmp. Only the
    holder of the run's lock calls this, so no live write is swept."""
    found = [*(out / "checkpoints").glob(".tmp_step_*"), *(out / "checkpoints").glob("*.tmp"),
             *(out / "replay").glob("*.tmp"), *out.glob("*.tmp")]
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if found:
        log.info("removed %d temporary file(s) of interrupted writes in %s", len(found), out)


def _clear_progress(out: Path) -> None:
    """A run that begins at step 0 begins with empty metrics, samples and replay pool: whatever an
    earlier run killed before its first checkpoint logged there is not part of this one."""
    for name in ("metrics.jsonl", "samples", "replay", "eval.json"):
        p = out / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _nonfinite_message(what: str, step: int, cfg: Config, out: Path) -> str:
    """``step`` counts the updates done before this one: the log's and the message's update is step + 1."""
    last = checkpoints.latest_step(out)
    where = f"step {last}" if last is not None else "none (no checkpoint yet)"
    return (f"non-finite {what} at update {step + 1} ({cfg.method}, lr {cfg.lr}, beta {cfg.beta}); "
            f"stopping. The newest checkpoint is {where} in {out / 'checkpoints'} (--resume checks it and "
            f"falls back past a damaged one); try a lower lr, mixed_precision=no, or check the data.")


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
    method: Method                     # the loss, and where winners and losers come from
    losers: replay.Losers              # the update's reference checkpoint and the losers of its batches
    loader: torch.utils.data.DataLoader
    sampler: data.ResumableDistributedSampler
    dataset: builders.Indexed
    batches_per_epoch: int
    params: list
    logger: runtime.Logger
    ema: object = None                 # diffusers.training_utils.EMAModel of the trainable weights (use_ema)


def setup(cfg: Config, ctx: runtime.Dist) -> Run:
    """Model on the device, data, optimizer, reference and replay pool."""
    out, device = Path(cfg.out_dir), ctx.device
    torch.manual_seed(cfg.seed)
    method = METHODS[cfg.method]
    preference = method.losers != "none"
    replayed = method.losers == "replayed"
    prepare_out_dir(cfg, ctx)
    if cfg.fsdp and ctx.world == 1:
        raise ValueError("fsdp shards the model across the processes of a torchrun job; "
                         "with one process, train without --fsdp")
    dataset = builders.Indexed(builders.build_dataset(cfg))  # before the model: a bad data path fails fast
    bundle = builders.build_bundle(cfg)
    for m in (None if cfg.fsdp else bundle.unet, bundle.text_encoder, bundle.text_encoder_2, bundle.vae):
        if m is not None:
            m.to(device)  # fsdp: fully_shard moves each rank's shards of the transformer to the device
    amp_dtype = runtime.autocast_dtype(cfg)
    models.cast_frozen(bundle, amp_dtype)  # frozen modules in the autocast dtype, trainable ones float32

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
    reference = replay.Reference(bundle, amp_dtype) if preference else None
    if cfg.fsdp:  # FSDP2 instead of DDP: the policy and its frozen reference copy, sharded alike
        sharding.shard(bundle.unet, cfg.model, device)
        if reference is not None:
            sharding.shard(reference.unet, cfg.model, device)
    params = bundle.trainable_parameters()  # after sharding, which replaces the Parameters
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.num_train_epochs:  # epochs -> updates, as the diffusers scripts derive max_train_steps
        cfg.max_steps = max(1, cfg.num_train_epochs * batches_per_epoch // cfg.grad_accum)
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb
        adamw = bnb.optim.AdamW8bit
    else:
        adamw = torch.optim.AdamW
    opt = adamw(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                weight_decay=cfg.weight_decay)
    # diffusers' schedules (a LambdaLR whose state_dict holds no lambdas, so checkpoints stay data)
    from diffusers.optimization import get_scheduler
    lr_sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    autocast = runtime.autocast(cfg, device)
    # DDP wraps the trainable module only; the reference is never wrapped.
    policy = DDP(bundle.unet, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.world > 1 and not cfg.fsdp else bundle.unet
    # The pool of replayable checkpoints: RCR for the SSPO family only. DPO-style methods' fixed
    # reference is the initial model, which ``reference`` already runs (built before a resume
    # loads the policy): no pool, so no copy of the base in replay/. SFT has no reference at all.
    pool = replay.CheckpointPool(strategy=cfg.replay, seed=cfg.seed, storage=cfg.pool_storage,
                                 directory=str((out / "replay").resolve())) if replayed else None
    process = noise.Process.from_config(bundle.scheduler_config, device)
    shape = models.latent_shape(bundle, config_mod.frame_size(cfg), cfg.num_frames)
    losers = replay.Losers(
        pool=pool, reference=reference, replayed=replayed, every=cfg.loser_every,
        group=max(1, cfg.loser_batch // cfg.batch_size), grad_accum=cfg.grad_accum,
        sample=dict(num_inference_steps=cfg.loser_steps, guidance_scale=cfg.loser_guidance,
                    scheduler=cfg.loser_scheduler),
        seed=cfg.seed, shape=shape, process=process, device=device, autocast=autocast)
    ema = None
    if cfg.use_ema:
        from diffusers.training_utils import EMAModel
        ema = EMAModel(params, decay=cfg.ema_decay)
    return Run(cfg=cfg, ctx=ctx, out=out, bundle=bundle, policy=policy, reference=reference, pool=pool, opt=opt, ema=ema,
               lr_sched=lr_sched, scaler=torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16"),
               autocast=autocast, noise=process, shape=shape, method=method, losers=losers, loader=loader,
               sampler=sampler, dataset=dataset, batches_per_epoch=batches_per_epoch, params=params,
               logger=runtime.Logger(cfg, ctx, out))


def start(run: Run) -> int:
    """Resume from the latest checkpoint, or begin: config.json, checkpoint 0, first samples."""
    cfg, ctx, out = run.cfg, run.ctx, run.out
    resumed = checkpoints.load_latest(out, run.bundle, run.opt, run.lr_sched, run.scaler, run.pool, cfg,
                                  cfg.resume_from_checkpoint or "latest", ema=run.ema) if cfg.resume else None
    run.logger.open_tracker(resumed)  # after the resume checks, which may refuse
    if resumed is not None:
        if ctx.rank == 0:
            checkpoints.truncate_metrics(out, resumed)  # rows after the checkpoint are logged again
            export.record_processes(out, resumed, ctx.world)
        run.logger.info(f"resumed from step {resumed}")
    else:
        if ctx.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _clear_progress(out)
            runtime.write_json(out / "config.json", config_mod.to_dict(cfg))
            export.record_processes(out, 0, ctx.world)  # the world size, which config.json does not hold
        ctx.barrier()  # the replay folder is cleared before any rank writes checkpoint 0 there
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
    epoch, within = divmod(step // run.losers.every * run.cfg.grad_accum, run.batches_per_epoch)
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
    SIGTERM arrived between micro-steps (the partial gradient is dropped). The update's
    reference checkpoint and its losers (reused over loser_every updates, sampled loser_batch
    pairs per call) come from ``run.losers`` (replay.Losers)."""
    cfg, ctx = run.cfg, run.ctx
    ref_idx = run.losers.begin(step)
    sums: dict[str, torch.Tensor] = {}
    held, weights, norm = None, None, None
    if run.method.loss == "sdpo":  # first pass: the update-wide normaliser (sdpo_normaliser)
        held = [run.losers.next_batch(stream, micro) for micro in range(cfg.grad_accum)]
        weights, norm = sdpo_normaliser(run, held, step)
    for micro in range(cfg.grad_accum):
        if micro and ctx.any_flag(stop.requested):
            run.opt.zero_grad(set_to_none=True)
            return None
        sync = micro == cfg.grad_accum - 1
        batch = held[micro] if held is not None else run.losers.next_batch(stream, micro)
        # DDP all-reduces on the last micro-step only; FSDP reduce-scatters every micro-step
        with (contextlib.nullcontext() if sync or ctx.world == 1 or cfg.fsdp else run.policy.no_sync()):
            sdpo = {} if weights is None else dict(zip(("log_weight", "ref_err"), weights[micro]), norm=norm)
            loss, metrics = training_step(run, batch, step, **sdpo)
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


def sdpo_normaliser(run: Run, held: list[dict], step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """SDPO's self-normalisation over one whole update: the pair log weights of every micro-batch
    in ``held`` (a forward of the reference and of the policy, no backward), and the mean kept
    clipped weight over all of them and all processes (one all-reduce of a sum and a count).
    The weights carry no gradient, so this pass changes nothing but the normaliser; the second
    pass (``training_step`` with ``log_weight``, ``ref_err`` and ``norm``) reuses these very
    weights and the reference's errors. Cost: one extra gradient-free forward of the policy per
    micro-batch (and the encoders' again).
    Returns ([((B,) log weights, ((B,) r_w, (B,) r_l)) per micro-batch], 0-d float32 normaliser)."""
    cfg, ctx = run.cfg, run.ctx
    weights = [training_step(run, b, step, weights_only=True) for b in held]
    total = sum(importance.kept_weight_sum(w, cfg.tau, cfg.eps_clip) for w, _ in weights)  # (2,) float64
    if ctx.world > 1:
        total = total.to(ctx.device if ctx.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(total)  # sum over processes
    return weights, (total[0] / total[1].clamp_min(1.0)).float().cpu()


def pair_log_weight(run: Run, pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """The DPO-C&M / SDPO pair log weight of one micro-batch (importance.pair_log_weight): policy
    and reference predictions and the target, (2B,*S) [winners; losers]; t (B,). (B,) float32."""
    cross_w, cross_l = importance.cross_term(pred, ref_pred, target).chunk(2)  # (2B,) -> (B,), (B,)
    floor_w, floor_l = importance.rounding_floor(pred, ref_pred).chunk(2)
    return importance.pair_log_weight(cross_w, cross_l, run.noise.importance_kappa(t), target[0].numel(),
                                      floor=floor_w + floor_l, temperature=run.cfg.weight_temperature)


def error(run: Run, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The per-sample errors every loss is built from: ``sspo.per_sample_error``, (N,) float32,
    times the min-SNR weight of each sample's index t ((N,) long) when ``snr_gamma`` is set
    (``noise.Process.snr_weight``, diffusers' --snr_gamma). Off (0), the errors are untouched.

    What the weight means per loss: for SFT it is diffusers' min-SNR-gamma loss. A preference
    pair shares one t, so its four errors (m_w, m_l, r_w, r_l) get one weight w_t: the loss
    becomes -log sigmoid(-beta w_t / 2 (...)), i.e. beta is replaced by beta * w_t, and the implicit
    rewards (and the logged rewards and errors) are those of a time-weighted ELBO, not of the plain
    one (the weighting omega(lambda_t) that Diffusion-DPO's derivation sets constant). SSPO's sign
    s (m_w > r_w) is unchanged by a positive weight; the DPO-C&M / SDPO pair weight is computed
    from the predictions and is not weighted."""
    err = sspo.per_sample_error(pred, target)
    return err * run.noise.snr_weight(t, run.cfg.snr_gamma) if run.cfg.snr_gamma else err


def training_step(run: Run, batch: dict, step: int, *, log_weight: torch.Tensor | None = None,
                  ref_err: tuple | None = None, norm: torch.Tensor | None = None, weights_only: bool = False):
    """Loss of one micro-batch; returns (scalar loss, metrics of detached 0-d tensors).
    DPO-C&M / SDPO: ``log_weight`` (B,) given is used instead of computing it here; ``norm`` is
    SDPO's update-wide normaliser (``sdpo_normaliser``); ``ref_err`` (r_w, r_l), given with
    ``log_weight``, replaces the reference's forward; ``weights_only`` returns the (B,) pair log
    weights and (r_w, r_l), computed without gradient."""
    cfg, bundle, device, autocast = run.cfg, run.bundle, run.ctx.device, run.autocast
    prompts, kind = batch["prompt"], run.method.loss
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
        x0_l = batch["x0_l"]  # replay.Losers: sampled by the drawn checkpoint (RCR, sec. 4.1), or the data's
        if run.method.losers == "data":  # a preference pair from the data set: pixels, encoded as the winners
            with torch.no_grad(), autocast():
                x0_l = models.encode_pixels(bundle, x0_l.to(device),
                                            noise.vae_generators(cfg.seed, step, batch["index"], 2))
        x0 = torch.cat([x0_w, x0_l.float()])  # [winners; losers]: (2B,*shape)
        t2, eps2, text2 = torch.cat([t, t]), torch.cat([eps, eps]), torch.cat([text, text])
        extra2 = models.cat_extra(extra_w, extra_l)  # SDXL: each image's own time_ids
    x_t = run.noise.q_sample(x0, t2, eps2)
    target = run.noise.target(x0, eps2, t2)  # eps, v, or the flow velocity eps - x0
    t_in = run.noise.model_t(t2)  # the network's timestep: t, or T * sigma_t for flows
    if ref_err is not None and log_weight is not None:  # SDPO's second pass: from the first
        r_w, r_l = ref_err
    elif kind != "sft":
        with torch.no_grad(), autocast():
            ref_pred = run.reference(x_t, t_in, text2, extra2)
        r_w, r_l = error(run, ref_pred, target, t2).chunk(2)  # (2B,) -> (B,), (B,)
    if weights_only:
        with torch.no_grad(), autocast():
            pred = models.unet_forward(bundle, run.policy, x_t, t_in, text2, extra2)
        return pair_log_weight(run, pred, ref_pred, target, t), (r_w, r_l)
    with autocast():
        pred = models.unet_forward(bundle, run.policy, x_t, t_in, text2, extra2)
    err = error(run, pred, target, t2)  # (2B,) float32 (or (B,) for SFT)
    if kind == "sft":
        losses, metrics = sspo.sft_loss(err)
    else:
        m_w, m_l = err.chunk(2)  # (2B,) -> (B,), (B,)
        if kind == "dpo":
            losses, metrics = sspo.dpo_loss(m_w, m_l, r_w, r_l, beta=cfg.beta)
        elif kind == "sspo":
            losses, metrics = sspo.sspo_loss(m_w, m_l, r_w, r_l, beta=cfg.beta, ssr=cfg.ssr)
        else:
            log_w = pair_log_weight(run, pred, ref_pred, target, t) if log_weight is None else log_weight
            kw = dict(beta=cfg.beta, tau=cfg.tau, eps_clip=cfg.eps_clip)
            if kind == "dpo_cm":
                losses, metrics = importance.dpo_cm_loss(m_w, m_l, r_w, r_l, log_w, **kw)
            else:
                losses, metrics = importance.sdpo_loss(m_w, m_l, r_w, r_l, log_w, norm=norm, **kw)
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
        if run.ema is not None:  # final/ holds the average; the weights return after
            run.ema.store(run.params)
            run.ema.copy_to(run.params)
        export.write_final(cfg, bundle, out, step)
        if not cfg.sample_every or step % cfg.sample_every:
            run.logger.samples(bundle, step, run.shape)
        if run.ema is not None:
            run.ema.restore(run.params)
    run.logger.close()
    run.ctx.barrier()
