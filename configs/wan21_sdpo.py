"""Wan2.1-T2V-1.3B with SDPO (arXiv 2505.21893 reports results on it), LoRA, flow matching
(velocity errors, logit-normal timesteps, flow.py), on video preference pairs
(pairs.jsonl: text, winner, loser). "assumed" marks numbers no source fixes.

    torchrun --nproc_per_node=8 train.py --config=wan21_sdpo \
        --model_path=/path/to/Wan2.1-T2V-1.3B-Diffusers --data_path=/path/to/video_pairs
"""

CONFIG = dict(
    model="wan",
    data="videopairs",
    method="sdpo",
    beta=5000.0,            # assumed (velocity errors; see flow.py derivation 3 on beta per family)
    weight_temperature=0.0049,  # dpo_cm/sdpo: tau/eps_clip were set on digits; this makes the weight per unit of
                            # implicit reward (2 T kappa_t D / beta) digits' at the median training t (D 2,096,640, flow velocity, logit-normal t, beta 5000);
                            # research.pair_weights.calibrated_temperature -> results/pair_weights.md
    lora_rank=32,           # assumed (diffusers' Wan LoRA examples use 32)
    num_frames=81,          # the release: 81 frames at 16 fps -> 21 latent frames
    height=480,             # the 1.3B model's native 480x832 (HxW): model card "480P" (832*480);
    width=832,              # WanPipeline.__call__ defaults height=480, width=832
    batch_size=1,
    grad_accum=8,           # assumed: global batch 64 on 8 GPUs
    lr=1e-4,                # assumed
    warmup_steps=100,       # assumed
    max_steps=1000,         # assumed
    replay_every=100,       # K of RCR (assumed)
    save_every=100,         # training checkpoints (assumed)
    loser_steps=50,         # WanPipeline's default num_inference_steps (only used by sspo)
    loser_guidance=5.0,     # WanPipeline's default guidance_scale; flow_shift 3.0 comes from the scheduler config
    mixed_precision="bf16",
    gradient_checkpointing=True,
    cfg_drop=0.0,
    num_workers=4,
    log_every=10,
    sample_every=200,
    out_dir="runs/wan21_sdpo",
)
