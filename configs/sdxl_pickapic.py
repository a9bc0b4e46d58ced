"""Stable Diffusion XL base 1.0 on Pick-a-Pic v2 (SSPO paper, Table 3: SDXL).

Sources, cited per number below:
  [DPO-sh]  Diffusion-DPO release, launchers/sdxl.sh (SalesforceAIResearch/DiffusionDPO): batch 1
            per GPU x 128 accumulation on 16 GPUs (the README assumes 16) = 2048 pairs, lr 1e-8
            with --scale_lr (x global batch), constant_with_warmup 200, 2000 updates, beta_dpo 5000,
            checkpointing every 200, the fp16-fix VAE.
  [DPO-py]  its train.py defaults for those runs: resolution 1024 for --sdxl, hflip on (the
            launcher does not pass --no_hflip), center crop, proportion_empty_prompts 0.2,
            AdamW weight decay 1e-2, max_grad_norm 1.0, fp16 mixed precision.
  [SSPO]    the paper: same data (ties removed) and beta as Diffusion-DPO; the SSPO-specific
            numbers (K, loser sampling) were lost in this project's copy of the paper: "assumed".
Where this preset departs from Diffusion-DPO it says so: bf16 instead of fp16 (no loss scaling;
SDXL's VAE runs in float32 here in any case, models/sdxl.py), and time_ids from each image's
real original size and crop (data/__init__.py), as SDXL itself was trained, where Diffusion-DPO's train.py
passes the constant (1024, 1024, 0, 0, 1024, 1024).

    torchrun --nproc_per_node=8 train.py --config=sdxl_pickapic --model_path=/path/to/sdxl-base-1.0 \
        --data_path=/path/to/pickapic_v2/data --method=sspo

Memory: python -m research.memory_sdxl writes results/memory_sdxl.md (full fine-tuning: 65 GB per GPU of
weights, gradients, DDP buckets, AdamW state, the reference copy and the frozen encoders/VAE,
before activations; LoRA r=8: 14 GB).
"""

CONFIG = dict(
    model="sdxl",
    data="pickapic",
    method="sspo",
    beta=5000.0,            # [DPO-sh] --beta_dpo 5000; [SSPO] same beta as Diffusion-DPO
    weight_temperature=0.0098,  # dpo_cm/sdpo: tau/eps_clip were set on digits; this makes the weight per unit of
                            # implicit reward (2 T kappa_t D / beta) digits' at the median training t (D 65,536, beta 5000);
                            # research.pair_weights.calibrated_temperature -> results/pair_weights.md
    resolution=1024,        # [DPO-py] args.resolution = 1024 for --sdxl; latents 128x128
    random_crop=False,      # [DPO-py] center crop (--random_crop not passed)
    hflip=True,             # [DPO-py] flips on unless --no_hflip
    batch_size=1,           # [DPO-sh] --train_batch_size=1 (per GPU per micro-step)
    grad_accum=256,         # [DPO-sh] global batch 2048 = 16 GPUs x 128; here 8 GPUs x 256 (same 2048)
    lr=1e-8 * 2048,         # [DPO-sh] --learning_rate=1e-8 --scale_lr: 1e-8 x global batch 2048
    warmup_steps=200,       # [DPO-sh] --lr_warmup_steps=200, constant afterwards
    max_steps=2000,         # [DPO-sh] --max_train_steps=2000
    weight_decay=1e-2,      # [DPO-py] --adam_weight_decay default 1e-2
    max_grad_norm=1.0,      # [DPO-py] --max_grad_norm default
    cfg_drop=0.2,           # [DPO-py] --proportion_empty_prompts default 0.2
    replay_every=200,       # K of RCR: assumed = [DPO-sh] --checkpointing_steps 200
    save_every=200,         # training checkpoints (saving only)
    pool_storage="disk",    # a full SDXL UNet snapshot is 10.3 GB in fp32: safetensors files
    keep_checkpoints=2,
    loser_steps=20,         # assumed; DDIM with guidance, as for SD-1.5
    loser_guidance=5.0,     # assumed: StableDiffusionXLPipeline's default guidance_scale
    mixed_precision="bf16",  # departs from [DPO-py] fp16: bf16 needs no loss scaling
    gradient_checkpointing=True,  # assumed: needed for 1024 px at batch 1 on 80 GB
    num_workers=4,
    log_every=10,
    sample_every=200,
    num_sample_prompts=4,   # 1024 px sample grids
    out_dir="runs/sdxl_pickapic",
)
