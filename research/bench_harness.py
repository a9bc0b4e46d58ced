"""The model under test for research/bench.py: one model in one mode with a reference, replay
pools, an optimizer and one fixed batch, driving the training loop's own ``loop.training_step``
and ``loop.update``."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from types import SimpleNamespace

import torch

METHOD_OF = {"sft": "sft", "dpo": "dpo", "sspo_nogen": "sspo", "sspo": "sspo"}  # sspo_nogen: the batch's losers
# The SD-1.5 UNet of the release (runwayml's unet/config.json); diffusers' default differs in cross_attention_dim.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 cross_attention_dim=768, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)



def build_bundle(model: str, lora_rank: int, grad_ckpt: bool, width: tuple | None = None):
    """digits, or the SD-1.5-shaped UNet (random weights) with ``width`` = its block_out_channels
    (None: the real (320, 640, 1280, 1280); the CPU bench divides them by 10, same layout)."""
    # Project modules import lazily: the memory child that only allocates a tensor (tests) and
    # the CLI's --help stay fast.
    import models
    from models import common
    if model == "digits":
        return models.build_model("digits", None, lora_rank=lora_rank, gradient_checkpointing=grad_ckpt)
    from diffusers import UNet2DConditionModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**dict(SD15_UNET, **({"block_out_channels": tuple(width)} if width else {})))
        text_encoder = common.tiny_text_encoder(768).requires_grad_(False).eval()
    # The same steps as models.build_model (which only loads sd15 from a directory; writing
    # 3.4 GB of random weights to disk to load them back would measure nothing of interest).
    unet.requires_grad_(False)
    if lora_rank > 0:
        unet.add_adapter(models.lora_config(lora_rank), adapter_name="default")  # as models.build_model
    bundle = models.Bundle(family="sd15", unet=unet, text_encoder=text_encoder,
                           tokenizer=common.clip_tokenizer(), vae=None,
                           scheduler_config=dict(common.SD15_SCHEDULER), lora=lora_rank > 0,
                           num_frames=0)
    for p in bundle.trainable_parameters():
        p.requires_grad_(True)
    if grad_ckpt:
        unet.enable_gradient_checkpointing()
    unet.train()
    return bundle


class Harness:
    """One model in one mode (full FT or LoRA) with a reference, replay pools, an optimizer
    and one fixed batch: every method runs on the same weights, batch and noise."""

    def __init__(self, model: str, lora: bool, p: dict, device: torch.device,
                 reference: bool = True, storages: tuple = (), pool_dir: str | None = None):
        import config, models, noise, replay, sspo
        self.p, self.device = p, device
        self.bundle = build_bundle(model, p["lora_rank"] if lora else 0, p["grad_ckpt"], p.get("width"))
        if p.get("channels_last"):
            self.bundle.unet.to(memory_format=torch.channels_last)
        self.bundle.unet.to(device)
        self.bundle.text_encoder.to(device)
        self.cfg = config.Config(method="sspo", beta=p["beta"], loser_steps=p["loser_steps"],
                                 loser_guidance=p["guidance"], batch_size=p["batch"],
                                 loser_scheduler=p.get("scheduler", "ddim"))
        sc = self.bundle.scheduler_config
        self.schedule = sspo.make_schedule(sc["num_train_timesteps"], sc["beta_start"],
                                           sc["beta_end"], sc["beta_schedule"])
        self.abar = self.schedule["alphas_cumprod"].to(device)
        self.shape = (p["channels"], p["latent"], p["latent"])
        B = p["batch"]
        g = torch.Generator().manual_seed(0)
        names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        self.batch = {"prompt": [f"a handwritten digit {names[i % 10]}" for i in range(B)],
                      "x0_w": torch.randn(B, *self.shape, generator=g),
                      "x0_l": torch.randn(B, *self.shape, generator=g),
                      "index": torch.arange(B)}
        self.autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16))
                         if p["bf16"] else contextlib.nullcontext)
        amp = torch.bfloat16 if p["bf16"] else None
        models.cast_frozen(self.bundle, amp)  # frozen modules in the autocast dtype, as loop.setup holds them
        self.reference = replay.Reference(self.bundle, amp) if reference else None
        # Replay pools: checkpoint 0 (the initial model) in each storage asked for.
        self.pools = {}
        for s in storages:
            self.pools[s] = replay.CheckpointPool("uniform", seed=0, storage=s,
                                                  directory=os.path.join(pool_dir or ".", s))
            self.pools[s].add(self.bundle.trainable_state_dict(), 0)
            if s == "memory_bf16":  # checkpoint 0 is kept exact: time the swap of a bf16 snapshot
                self.pools[s].add(self.bundle.trainable_state_dict(), 1)
        if self.reference is not None and self.pools:
            self.reference.load(self.pools[p["storage"]].get(0))
        self.opt = None  # built on the first step (a swap-only harness needs no Adam state)
        # What loop.training_step reads of a loop.Run (the rest of a Run is the loop's own).
        self.run = SimpleNamespace(cfg=self.cfg, bundle=self.bundle, policy=self.bundle.unet,
                                   reference=self.reference, ctx=SimpleNamespace(device=device),
                                   autocast=self.autocast, shape=self.shape, abar=self.abar,
                                   noise=noise.Process.from_config(sc, device), method=config.METHODS["sspo"])

    def snapshot_mb(self, dtype_bytes: int = 4) -> float:
        """Host RAM one snapshot takes with pool_storage memory (4 B) or memory_bf16 (2 B)."""
        return sum(p.numel() for p in self.bundle.trainable_parameters()) * dtype_bytes / 2**20

    def swap(self, storage: str, step: int = 0) -> None:
        """Random Checkpoint Replay's swap: copy a checkpoint into the reference (the newest, so
        that a memory_bf16 pool swaps a bf16 snapshot; ``step`` keys nothing any more)."""
        pool = self.pools[storage]
        self.reference.load(pool.get(len(pool) - 1))

    def generate(self, guidance: float, steps: int | None = None, scheduler: str | None = None,
                 autocast: bool = True) -> torch.Tensor:
        """Loser generation alone, called as training_step calls it (default: the profile's
        steps and scheduler, under the profile's autocast)."""
        from models import sampling
        z = torch.randn(self.p["batch"], *self.shape, generator=torch.Generator().manual_seed(1))
        with self.autocast() if autocast else contextlib.nullcontext():
            return sampling.sample(self.bundle, self.reference, self.batch["prompt"],
                                   latents=z.to(self.device), latent_shape=self.shape,
                                   num_inference_steps=steps or self.p["loser_steps"],
                                   guidance_scale=guidance, scheduler=scheduler or self.cfg.loser_scheduler)

    def cycle(self, method: str, loser: dict, step: int) -> int:
        """``loop.update`` itself for one loser-generation cycle: k = loser["every"] updates for
        "sspo" (the first swaps the reference and samples the losers, the others reuse them with
        the same reference), one update for "dpo"; each update has loser["accum"] micro-steps of
        the fixed batch (default 1), the SSPO losers sampled loser["batch"] pairs per call
        (0: one micro-batch). Returns the number of updates run. The reference is reloaded at
        each cycle's start (RCR's worst case: a new checkpoint each time)."""
        import config
        import loop
        import replay
        from infra import runtime
        if self.opt is None:
            self.step("sft")  # builds the optimizer (one untimed update)
        if not hasattr(self, "_loop_run"):
            cfg = dataclasses.replace(self.cfg, grad_accum=loser.get("accum", 1), loser_steps=loser["steps"],
                                      loser_guidance=loser["guidance"], loser_scheduler=loser["scheduler"],
                                      loser_every=loser["every"], loser_batch=loser.get("batch", 0))
            # DPO keeps no pool, as in the loop: its reference is never reloaded. Here the reference
            # holds whichever checkpoint an SSPO cycle loaded last, which costs the same to run.
            self._loop_run = SimpleNamespace(
                **{**vars(self.run), "cfg": cfg, "ctx": runtime.Dist(device=self.device)}, opt=self.opt,
                params=self.bundle.trainable_parameters(), out=".",
                scaler=torch.amp.GradScaler(self.device.type, enabled=False),
                lr_sched=torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0),
                pools={"sspo": self.pools[self.p["storage"]], "dpo": None})
        run = self._loop_run
        cfg = run.cfg
        run.method = config.METHODS[METHOD_OF[method]]
        run.pool = run.pools[method]
        # a new Losers each cycle: the reference is reloaded at the cycle's start
        run.losers = replay.Losers(
            pool=run.pool, reference=self.reference, replayed=run.method.losers == "replayed",
            every=cfg.loser_every, group=max(1, cfg.loser_batch // cfg.batch_size), grad_accum=cfg.grad_accum,
            sample=dict(num_inference_steps=cfg.loser_steps, guidance_scale=cfg.loser_guidance,
                        scheduler=cfg.loser_scheduler),
            seed=cfg.seed, shape=self.shape, process=run.noise, device=self.device, autocast=self.autocast)
        k = run.losers.every
        stream = iter(lambda: self.batch, None)  # the same batch (a fresh dict per call)
        stop = SimpleNamespace(requested=False)
        for i in range(k):
            loop.update(run, stream, step * k + i, stop)
        return k

    def step(self, method: str, step: int = 0) -> None:
        """One optimizer update, as loop.update does it (grad_accum 1, no DDP)."""
        import config
        import loop
        params = self.bundle.trainable_parameters()
        if self.opt is None:
            self.opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                         betas=(self.cfg.adam_beta1, self.cfg.adam_beta2))
        batch = self.batch  # sspo_nogen: its x0_l stands for replayed losers
        if method == "sspo":  # worst case of RCR: a different checkpoint every update, then its losers
            self.swap(self.p["storage"], step)
            batch = dict(self.batch, x0_l=self.generate(self.cfg.loser_guidance))
        self.run.method = config.METHODS[METHOD_OF[method]]
        loss, _ = loop.training_step(self.run, batch, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
