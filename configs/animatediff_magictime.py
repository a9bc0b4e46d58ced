"""AnimateDiff (SD-1.5 + motion adapter) on MagicTime time-lapse videos, as in the SSPO paper
(section 5.1.2): LoRA, 16 frames by dynamic (uniform) frame extraction, ChronoMagic-Bench-150
for validation. The resolution, learning rate and number of steps were lost in this project's
copy of the paper; the values below are assumed and marked so.

    torchrun --nproc_per_node=8 train.py --config=animatediff_magictime \
        --model_path=/path/to/sd15 --motion_adapter_path=/path/to/motion_adapter \
        --data_path=/path/to/magictime/videos --method=sspo \
        --magictime_csv=/path/to/magictime/caption.csv   # columns videoid,name; or a metadata.jsonl in data_path
"""

CONFIG = dict(
    model="animatediff",
    data="videofolder",
    method="sspo",
    beta=5000.0,            # as for images (assumed)
    weight_temperature=0.0098,  # dpo_cm/sdpo: tau/eps_clip were set on digits; this makes the weight per unit of
                            # implicit reward (2 T kappa_t D / beta) digits' at the median training t (D 65,536 (16 x 32 x 32 x 4), beta 5000);
                            # research.pair_weights.calibrated_temperature -> results/pair_weights.md
    lora_rank=64,           # paper: LoRA; rank assumed
    num_frames=16,          # paper: 16 frames
    resolution=256,         # assumed
    batch_size=1,
    grad_accum=16,          # assumed
    lr=1e-5,                # assumed
    warmup_steps=100,       # assumed
    max_steps=2000,         # assumed
    replay_every=200,       # K of RCR (assumed)
    save_every=200,         # training checkpoints (assumed)
    pool_storage="memory",  # LoRA snapshots are small
    loser_steps=20,
    loser_guidance=7.5,
    mixed_precision="bf16",
    gradient_checkpointing=True,
    cfg_drop=0.0,
    num_workers=4,
    log_every=10,
    sample_every=200,
    out_dir="runs/animatediff_magictime",
)
