"""CogVideoX-2B / -5B with SDPO (arXiv 2505.21893 reports results on both), LoRA, on video
preference pairs (pairs.jsonl: text, winner, loser). Where a number comes from is on its line;
"assumed" means neither the SDPO abstract nor the model's recipe fixes it.

    torchrun --nproc_per_node=8 train.py --config=cogvideox_sdpo \
        --model_path=/path/to/CogVideoX-2b --data_path=/path/to/video_pairs
    (--model_path=/path/to/CogVideoX-5b for the 5B; --method=sft|dpo|dpo_cm|sspo work too)
"""

CONFIG = dict(
    model="cogvideox",
    data="videopairs",
    method="sdpo",
    beta=5000.0,            # assumed: as the SD-1.5 Diffusion-DPO preset (v errors, sspo.py convention)
    weight_temperature=0.0065,  # dpo_cm/sdpo: tau/eps_clip were set on digits; this makes the weight per unit of
                            # implicit reward (2 T kappa_t D / beta) digits' at the median training t (D 1,123,200, v-prediction, zero terminal SNR, beta 5000);
                            # research.pair_weights.calibrated_temperature -> results/pair_weights.md
    lora_rank=128,          # CogVideoX's own LoRA fine-tuning recipe (THUDM finetune scripts: rank 128)
    num_frames=49,          # the release: 49 frames at 8 fps (model card) -> 13 latent frames
    height=480,             # the release's native 480x720 (HxW): model card "Video Resolution 720 * 480";
    width=720,              # CogVideoXPipeline's default = transformer sample_height 60 / sample_width 90 x 8;
                            # diffusers' CogVideoX LoRA example script: --height 480 --width 720
    batch_size=1,
    grad_accum=8,           # assumed: global batch 64 on 8 GPUs
    lr=1e-4,                # assumed (CogVideoX LoRA recipes use 1e-4 .. 1e-3)
    warmup_steps=100,       # assumed
    max_steps=1000,         # assumed
    replay_every=100,       # K of RCR (assumed)
    save_every=100,         # training checkpoints (assumed)
    loser_steps=50,         # CogVideoXPipeline's default num_inference_steps (only used by sspo)
    loser_guidance=6.0,     # CogVideoXPipeline's default guidance_scale
    mixed_precision="bf16",  # the releases are bf16 (-5b) / fp16 (-2b) models; bf16 for training
    gradient_checkpointing=True,
    cfg_drop=0.0,
    num_workers=4,
    log_every=10,
    sample_every=200,
    out_dir="runs/cogvideox_sdpo",
)
