"""The training loop: SFT, Diffusion-DPO, SPIN-Diffusion, SSPO (and its ablations, SSPOr),
DPO-C&M and SDPO, for the digits model, SD-1.5 and AnimateDiff, on one process or under torchrun.

    python train.py                                   # the embedded default: SSPO on digits
    python train.py --method=dpo --max_steps=200      # any config key, see --help
    torchrun --nproc_per_node=8 train.py --config=sd15_pickapic --method=sspo

One SSPO update ([SSPO] Algorithm 1 / DESIGN.md "One SSPO step, as data"):
  1. a batch of prompts and winners x0_w (B items) from data.py;
  2. replay.py picks a checkpoint from the pool (uniform = Random Checkpoint Replay), loads it
     into the reference network and samples x0_l for the same prompts, in latent space;
  3. [x0_w; x0_l] (2B) share one (t, eps) per pair; the reference runs once on 2B without grad,
     the policy once on 2B with grad;
  4. sspo.py turns the four per-sample errors into per-sample losses (eq. 8-9).
Infrastructure (checkpoint files, logging, samples) lives in runtime.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import config as config_mod
import data
import models
import replay
import runtime
import sspo
from config import DATA_MODE_OF, LOSS_OF, Config

DIGITS_BASE_SEED = 0  # every digits run, whatever its seed, aligns the same cached base


# ---------------------------------------------------------------------------------------------
# Building blocks: data, model, per-pair noise
# ---------------------------------------------------------------------------------------------


def build_dataset(cfg: Config):
    mode = DATA_MODE_OF[cfg.method]
    common = dict(mode=mode, cfg_drop=cfg.cfg_drop, seed=cfg.seed)
    if cfg.data == "digits":
        classes = [int(c) for c in cfg.digits_classes.split(",") if c.strip()] or None  # validated
        corrupt = cfg.digits_corrupt if cfg.data_split == "pretrain" else 0.0
        return data.DigitsDataset(cfg.data_split, corrupt_fraction=corrupt,
                                  classes=classes if cfg.data_split == "align" else None, **common)
    aug = dict(resolution=cfg.resolution, random_crop=cfg.random_crop, hflip=cfg.hflip,
               cfg_drop=cfg.cfg_drop, seed=cfg.seed)
    if cfg.data == "pickapic":
        return data.PickAPicDataset(cfg.data_path, mode=mode, **aug)
    if mode == "pairs":
        raise ValueError(f"method {cfg.method!r} needs preference pairs; data {cfg.data!r} has none")
    if cfg.data == "imagefolder":
        return data.ImageFolderDataset(cfg.data_path, **aug)
    return data.VideoFolderDataset(cfg.data_path, num_frames=cfg.num_frames, **aug)


class _Indexed(torch.utils.data.Dataset):
    """Adds each item's dataset index, which keys its noise (so DDP == one process)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def set_epoch(self, epoch):
        self.ds.set_epoch(epoch)

    def __getitem__(self, i):
        item = self.ds[i]
        return None if item is None else {**item, "index": i}


def ensure_digits_base(cfg: Config, ctx: runtime.Dist) -> Path:
    """The misaligned digits base (DESIGN.md): SFT from scratch on the pretrain split with a
    fraction of wrong captions, cached under cache_dir and rebuilt only if missing."""
    name = f"digits_base_steps{cfg.digits_base_steps}_corrupt{cfg.digits_corrupt:g}_v1"
    path = Path(cfg.cache_dir) / name
    if (path / "model_index.json").exists():
        return path
    runtime.log0(ctx, f"building the digits base model ({cfg.digits_base_steps} updates, "
                 f"{cfg.digits_corrupt:.0%} wrong captions) -> {path}")
    base_cfg = Config(
        method="sft", init="scratch", data_split="pretrain", max_steps=cfg.digits_base_steps,
        batch_size=64, lr=1e-3, warmup_steps=50, cfg_drop=0.1, seed=DIGITS_BASE_SEED,
        digits_corrupt=cfg.digits_corrupt, save_every=cfg.digits_base_steps, log_every=100,
        sample_every=0, out_dir=str(path) + ".run", cache_dir=cfg.cache_dir, keep_checkpoints=1,
        overwrite=True)
    run_dir = train(base_cfg, ctx)
    if ctx.rank == 0:
        os.replace(run_dir / "final", path)  # atomic: the cache entry appears complete or not at all
        shutil.rmtree(run_dir, ignore_errors=True)
    ctx.barrier()
    return path


def build_bundle(cfg: Config, ctx: runtime.Dist) -> models.Bundle:
    if cfg.model == "digits":
        path = None if cfg.init == "scratch" else (cfg.model_path or str(ensure_digits_base(cfg, ctx)))
        return models.build_model("digits", path, lora_rank=cfg.lora_rank,
                                  gradient_checkpointing=cfg.gradient_checkpointing)
    return models.build_model(cfg.model, cfg.model_path or None, lora_rank=cfg.lora_rank,
                              gradient_checkpointing=cfg.gradient_checkpointing,
                              local_files_only=cfg.local_files_only,
                              num_frames=cfg.num_frames,
                              motion_adapter_path=cfg.motion_adapter_path or None)


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
        for name in ("checkpoints", "final", "samples", "replay", "metrics.jsonl", "eval.json"):
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    ctx.barrier()


def _nonfinite_message(what: str, step: int, cfg: Config, out: Path) -> str:
    last = runtime.latest_step(out)
    where = f"step {last}" if last is not None else "none (no checkpoint yet)"
    return (f"non-finite {what} at update {step} ({cfg.method}, lr {cfg.lr}, beta {cfg.beta}); "
            f"stopping. The last good checkpoint is {where} in {out / 'checkpoints'}; "
            f"try a lower lr, mixed_precision=no, or check the data.")


def pair_noise(seed: int, step: int, indices: torch.Tensor, shape: tuple, num_timesteps: int):
    """One (t, eps) per pair and the initial noise of its replayed sample, keyed by
    (seed, update, dataset index): the same numbers whatever the world size or micro-batching.
    Returns t (B,) long, eps (B,*shape), z_T (B,*shape)."""
    ts, eps, z = [], [], []
    for i in indices.tolist():
        g = torch.Generator().manual_seed(hash((seed, step, i)) & (2 ** 63 - 1))
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
        eps.append(torch.randn(shape, generator=g))
        z.append(torch.randn(shape, generator=g))
    return torch.cat(ts), torch.stack(eps), torch.stack(z)


def latent_shape(bundle: models.Bundle, cfg: Config) -> tuple:
    if bundle.family == "digits":
        return (1, 8, 8)
    down = 2 ** (len(bundle.vae.config.block_out_channels) - 1)  # 8 for SD-1.5's VAE
    if cfg.resolution % down:
        raise ValueError(f"resolution {cfg.resolution} must be a multiple of the VAE's factor {down}")
    c, s = bundle.unet.config.in_channels, cfg.resolution // down
    return (c, cfg.num_frames, s, s) if bundle.num_frames else (c, s, s)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def run(overrides: dict | None = None, argv: list[str] | None = None) -> Path:
    """Resolve the config, set up (or join) torch.distributed, train; returns the output dir."""
    cfg = config_mod.resolve(overrides, argv)
    ctx = runtime.setup_distributed()
    try:
        return train(cfg, ctx)
    finally:
        ctx.teardown()


def train(cfg: Config, ctx: runtime.Dist) -> Path:
    out = Path(cfg.out_dir)
    device = ctx.device
    torch.manual_seed(cfg.seed)
    loss_kind = LOSS_OF[cfg.method]
    preference = loss_kind != "sft"

    prepare_out_dir(cfg, ctx)
    bundle = build_bundle(cfg, ctx)
    torch.manual_seed(cfg.seed)  # building a missing digits base consumes the RNG: reseed
    for m in (bundle.unet, bundle.text_encoder, bundle.vae):
        if m is not None:
            m.to(device)
    sched_cfg = bundle.scheduler_config
    schedule = sspo.make_schedule(sched_cfg["num_train_timesteps"], sched_cfg["beta_start"],
                                  sched_cfg["beta_end"], sched_cfg["beta_schedule"])
    abar = schedule["alphas_cumprod"].to(device)
    prediction_type = sched_cfg.get("prediction_type", "epsilon")
    shape = latent_shape(bundle, cfg)

    dataset = _Indexed(build_dataset(cfg))
    sampler = data.ResumableDistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank,
                                               shuffle=True, seed=cfg.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                         collate_fn=data.collate, drop_last=True,
                                         num_workers=cfg.num_workers)  # "index" -> (B,) long
    batches_per_epoch = sampler.num_samples // cfg.batch_size
    if batches_per_epoch < 1:
        raise ValueError(f"dataset of {len(dataset)} items is smaller than one global batch "
                         f"({cfg.batch_size} x {ctx.world} processes)")

    params = bundle.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    warm = max(cfg.warmup_steps, 0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    # Built before DDP: with LoRA the reference is a second adapter on the same UNet.
    reference = replay.Reference(bundle) if preference else None
    # DDP wraps the trainable module only; the reference is never wrapped.
    policy = DDP(bundle.unet, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.world > 1 else bundle.unet
    # The pool of replayable checkpoints: RCR for the SSPO family; for DPO-style methods it only
    # holds checkpoint 0, the fixed initial reference; SFT needs no reference at all.
    pool = replay.CheckpointPool(strategy=cfg.replay if loss_kind == "sspo" else "initial",
                                 seed=cfg.seed, storage=cfg.pool_storage,
                                 directory=str((out / "replay").resolve())) if preference else None

    step = 0
    logger = runtime.Logger(cfg, ctx, out)
    resumed = runtime.load_latest(out, bundle, opt, lr_sched, scaler, pool, cfg) if cfg.resume else None
    if resumed is not None:
        step = resumed
        logger.info(f"resumed from step {step}")
    else:
        if ctx.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            runtime.write_json(out / "config.json", config_mod.to_dict(cfg))
        if pool is not None:
            pool.add(bundle.trainable_state_dict(), 0)  # checkpoint 0 = the initial model
        if cfg.sample_every and ctx.rank == 0:
            runtime.save_samples(cfg, bundle, out, 0, shape)  # the starting point, for comparison
    ctx.barrier()
    loaded_ref = None  # which pool entry the reference holds now

    def batches():
        epoch, within = divmod(step * cfg.grad_accum, batches_per_epoch)
        while True:
            sampler.set_epoch(epoch, start=within * cfg.batch_size)
            dataset.set_epoch(epoch)
            for b in loader:
                yield b
            epoch, within = epoch + 1, 0

    stream = batches()
    logger.info(f"{cfg.method} on {cfg.model}/{cfg.data}: {len(dataset)} items, global batch "
                f"{cfg.batch_size} x {cfg.grad_accum} accum x {ctx.world} procs = "
                f"{cfg.batch_size * cfg.grad_accum * ctx.world}, {len(params)} trainable tensors "
                f"({sum(p.numel() for p in params) / 1e6:.2f}M params)")
    stop = runtime.StopOnSignal()
    bundle.unet.train()
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            ref_idx = pool.choose(step) if preference else None
            if preference and ref_idx != loaded_ref:
                reference.load(pool.get(ref_idx))  # in place: one reference module, or a LoRA adapter
                loaded_ref = ref_idx
            sums: dict[str, torch.Tensor] = {}
            stopping = False
            for micro in range(cfg.grad_accum):
                # A preemption (SIGTERM) is honoured between micro-steps, not only after a long
                # accumulated update: the partial gradient is dropped and step `step` is saved.
                if micro and ctx.any_flag(stop.requested):
                    stopping = True
                    break
                batch = next(stream)
                while not batch["prompt"]:  # every item of this batch was unreadable (counted)
                    batch = next(stream)
                sync = micro == cfg.grad_accum - 1
                with (contextlib.nullcontext() if sync or ctx.world == 1 else policy.no_sync()):
                    loss, metrics = training_step(cfg, bundle, policy, reference, batch, step, shape,
                                                  abar, schedule, prediction_type, loss_kind, autocast,
                                                  device)
                    scaler.scale(loss / cfg.grad_accum).backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v.detach() / cfg.grad_accum
            if stopping:
                opt.zero_grad(set_to_none=True)
                runtime.save_checkpoint(out, step, bundle, opt, lr_sched, scaler, pool, cfg, ctx)
                logger.info(f"signal received: saved step {step}, exiting cleanly")
                break
            if not ctx.all_finite(sums["loss"]):
                raise FloatingPointError(_nonfinite_message("loss", step, cfg, out))
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            # fp16's GradScaler skips steps with inf/NaN gradients by design; otherwise a
            # non-finite gradient would poison the weights, the replay pool and the next checkpoint.
            if not scaler.is_enabled() and not ctx.all_finite(grad_norm):
                raise FloatingPointError(_nonfinite_message("gradient", step, cfg, out))
            sums["grad_norm"] = grad_norm.detach()
            lr = lr_sched.get_last_lr()[0]  # the rate this update uses
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            lr_sched.step()
            step += 1

            if preference:
                sums["ref_checkpoint"] = torch.tensor(float(ref_idx))
            logger.step(step, sums, lr, time.perf_counter() - t0)
            stopping = ctx.any_flag(stop.requested)
            if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
                if step % cfg.save_every == 0 and loss_kind == "sspo":
                    pool.add(bundle.trainable_state_dict(), step)
                runtime.save_checkpoint(out, step, bundle, opt, lr_sched, scaler, pool, cfg, ctx)
            if cfg.sample_every and step % cfg.sample_every == 0 and ctx.rank == 0:
                runtime.save_samples(cfg, bundle, out, step, shape)
            if stopping:
                logger.info(f"signal received: saved step {step}, exiting cleanly")
                break
    finally:
        stop.restore()
    if step >= cfg.max_steps and ctx.rank == 0:
        final = out / "final"
        tmp = out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        models.save_model(bundle, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if not cfg.sample_every or step % cfg.sample_every:
            runtime.save_samples(cfg, bundle, out, step, shape)
    logger.close()
    ctx.barrier()
    return out


def training_step(cfg, bundle, policy, reference, batch, step, shape, abar, schedule,
                  prediction_type, loss_kind, autocast, device):
    """Loss of one micro-batch; returns (scalar loss, metrics of detached 0-d tensors)."""
    prompts = batch["prompt"]
    with torch.no_grad(), autocast():
        # float32 from here on: under bf16 autocast the VAE returns bf16 latents, and a bf16
        # schedule rounds abar_t to 1 at small t (no noise added at all).
        x0_w = models.encode_pixels(bundle, batch["x0_w"].to(device)).float()  # (B,*shape)
        text = models.encode_prompts(bundle, prompts)  # (B,77,D)
    t, eps, z_T = (v.to(device) for v in pair_noise(cfg.seed, step, batch["index"], shape,
                                                      abar.numel()))
    if loss_kind == "sft":
        x0, t2, eps2, text2 = x0_w, t, eps, text
    else:
        if loss_kind == "sspo":  # the replayed checkpoint samples the "losers" (RCR, sec. 4.1)
            with autocast():
                x0_l = replay.sample_losers(bundle, reference, prompts, latents=z_T,
                                            num_inference_steps=cfg.loser_steps,
                                            guidance_scale=cfg.loser_guidance, latent_shape=shape)
        else:  # a preference pair from the data set
            with torch.no_grad(), autocast():
                x0_l = models.encode_pixels(bundle, batch["x0_l"].to(device))
        x0 = torch.cat([x0_w, x0_l.float()])  # [winners; losers]: (2B,*shape)
        t2, eps2, text2 = torch.cat([t, t]), torch.cat([eps, eps]), torch.cat([text, text])
    x_t = sspo.q_sample(x0, t2, eps2, abar)
    target = sspo.training_target(x0, eps2, t2, abar, prediction_type)
    if loss_kind != "sft":
        with torch.no_grad(), autocast():
            ref_pred = reference(x_t, t2, text2)
        r_w, r_l = sspo.per_sample_error(ref_pred, target).chunk(2)  # (2B,) -> (B,), (B,)
    with autocast():
        pred = models.unet_forward(bundle, policy, x_t, t2, text2)
    err = sspo.per_sample_error(pred, target)  # (2B,) float32 (or (B,) for SFT)
    if loss_kind == "sft":
        losses, metrics = sspo.sft_loss(err)
    else:
        m_w, m_l = err.chunk(2)  # (2B,) -> (B,), (B,)
        if loss_kind == "dpo":
            losses, metrics = sspo.dpo_loss(m_w, m_l, r_w, r_l, beta=cfg.beta)
        elif loss_kind == "sspo":
            losses, metrics = sspo.sspo_loss(m_w, m_l, r_w, r_l, beta=cfg.beta, ssr=cfg.ssr)
        else:
            log_w = sspo.pair_log_weight(m_w, m_l, t, schedule, prediction_type)
            fn = sspo.dpo_cm_loss if loss_kind == "dpo_cm" else sspo.sdpo_loss
            losses, metrics = fn(m_w, m_l, r_w, r_l, log_w, beta=cfg.beta, tau=cfg.tau,
                                 eps_clip=cfg.eps_clip)
    loss = losses.mean()
    metrics["loss"] = loss.detach()
    return loss, metrics


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(config_mod.help_text())
        return 0
    try:
        out = run(argv=argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        cfg = json.loads((out / "config.json").read_text())
        if cfg["model"] == "digits" and (out / "final").exists():
            import evaluate  # the independent judge: how well the aligned model follows prompts
            evaluate.report_digits_run(out)
        print(f"done: {out} (samples/, metrics.jsonl, checkpoints/, final/"
              f"{', eval.json' if (out / 'eval.json').exists() else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
