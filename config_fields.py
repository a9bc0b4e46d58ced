"""The training settings themselves: every key with its type, default and help (``Config``),
the method presets, the allowed values, and the diffusers scripts' flag names accepted as
aliases. config.py reads presets and the command line into a Config and checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # ---- what to train
    method: str = _f("sspo", "sft | dpo | spin | sspo | sspo_r | dpo_cm | sdpo (see METHOD_PRESETS)")
    ssr: str = _f("sign", "Self-Sampling Regularization, SSPO eq. 9: sign | indicator | none (ablations)")
    replay: str = _f("uniform", "reference checkpoint drawn from the pool: uniform (RCR) | initial | last")
    model: str = _f("digits", "model family: digits | sd15 | animatediff | sdxl | cogvideox | wan")
    model_path: str = _f("", "local dir or hub id (sd15/animatediff/sdxl/cogvideox/wan); digits: '' = the cached base")
    motion_adapter_path: str = _f("", "animatediff: local dir of the MotionAdapter")
    local_files_only: bool = _f(True, "never reach a model hub (set false to let diffusers download)")
    data: str = _f("digits", "digits | pickapic | imagefolder | videofolder | videopairs (pairs.jsonl)")
    data_path: str = _f("", "local dataset directory (not used for digits); layouts: data_layouts.py")
    dataset_split_name: str = _f("train", "split read from data_path: pickapic shards {split}-*.parquet or "
                                 "a save_to_disk split; image/video folders: data_path/{split}/ if no metadata at the root")
    max_train_samples: int = _f(0, "keep only the first N items (pickapic: after dropping ties); 0 = all")
    caption_column: str = _f("text", "imagefolder/videofolder metadata column holding captions "
                             "('text' falls back to 'caption')")
    magictime_csv: str = _f("", "videofolder: a MagicTime caption CSV (columns videoid,name; videos at "
                            "data_path/{videoid}.mp4) read instead of a metadata file")
    # ---- the objective
    beta: float = _f(500.0, "DPO beta, sspo.py convention: inside = -beta/2 * (...); 5000 = 2500 w/o the 1/2")
    tau: float = _f(0.8, "dpo_cm/sdpo: mask pairs whose importance weight (importance.pair_log_weight) is "
                         "below tau; 0 = no mask. Shares masked: results/pair_weights.md")
    eps_clip: float = _f(0.05, "dpo_cm/sdpo: clip kept weights into [1-eps_clip, 1+eps_clip]; inf = no "
                              "clip (with tau=0: plain importance weighting)")
    # ---- Random Checkpoint Replay and loser generation (sspo, sspo_r, spin)
    save_every: int = _f(50, "optimizer updates between checkpoints (= replay pool snapshots)")
    pool_storage: str = _f("memory", "replay snapshots: memory (fp32) | memory_bf16 (checkpoint 0 exact) | disk (safetensors)")
    loser_steps: int = _f(10, "DDIM steps to sample a replayed (losing) sample")
    loser_guidance: float = _f(3.0, "classifier-free guidance scale for replayed samples")
    loser_scheduler: str = _f("ddim", "sampler of replayed samples: ddim | dpmsolver++ | unipc | euler (diffusers classes)")
    loser_every: int = _f(1, "sspo family: regenerate losers every k updates; the k-1 updates between "
                             "retrain on the same pairs with the checkpoint that made them as reference")
    loser_batch: int = _f(0, "sspo family: pairs per loser-sampling call, rounded down to whole micro-batches "
                             "(0 = one): the losers of several micro-batches of an update in one call")
    # ---- optimisation
    max_steps: int = _f(300, "optimizer updates")
    batch_size: int = _f(32, "pairs per device per micro-step")
    grad_accum: int = _f(1, "micro-steps per update; global batch = batch_size * grad_accum * world")
    lr: float = _f(1e-4, "AdamW learning rate (after warmup)")
    warmup_steps: int = _f(0, "linear learning-rate warmup, in updates")
    lr_scheduler: str = _f("constant_with_warmup", "diffusers.optimization.get_scheduler: constant | "
                           "constant_with_warmup | linear | cosine (linear/cosine decay to 0 at max_steps)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    max_grad_norm: float = _f(1.0, "gradient clipping (<= 0 disables)")
    mixed_precision: str = _f("no", "no | bf16 | fp16 (fp16 uses a GradScaler)")
    gradient_checkpointing: bool = _f(False, "recompute UNet activations in backward")
    lora_rank: int = _f(0, "0 = full fine-tuning (of the UNet, or motion modules); >0 = LoRA rank")
    fsdp: bool = _f(False, "cogvideox/wan full fine-tuning under torchrun: shard the transformer (and its "
                           "reference copy) with PyTorch's FSDP2 fully_shard instead of DDP (sharding.py)")
    # ---- data
    resolution: int = _f(512, "image (or frame) side in pixels for every family but digits")
    height: int = _f(0, "cogvideox/wan frame height in px, 0 = resolution (a multiple of 16: VAE 8 x patch 2)")
    width: int = _f(0, "cogvideox/wan frame width in px, 0 = resolution (releases: 480x720 CogVideoX, 480x832 Wan)")
    num_frames: int = _f(16, "frames per clip (animatediff; cogvideox/wan: 4k+1, e.g. 49 / 81)")
    random_crop: bool = _f(False, "random instead of center crop")
    hflip: bool = _f(False, "random horizontal flips")
    cfg_drop: float = _f(0.1, "probability of an empty caption (classifier-free guidance)")
    num_workers: int = _f(0, "DataLoader workers")
    # ---- the embedded digits default
    digits_base_steps: int = _f(1000, "updates of the (cached) misaligned base model's pretraining (half of them clean)")
    digits_corrupt: float = _f(0.65, "fraction of pretrain captions naming a wrong digit in the base's second stage")
    digits_loser_wrong: float = _f(0.5, "share of digits preference pairs whose loser shows a wrong digit "
                                        "(the rest: the right digit, smudged)")
    digits_classes: str = _f("", "comma-separated digit classes kept in the alignment split ('' = all)")
    digits_align_per_class: int = _f(0, "keep only the first N alignment digits of each class (0 = all; memorization runs)")
    cache_dir: str = _f(str(ROOT / "cache"), "where the digits base model is cached")
    # ---- run
    seed: int = _f(0, "seed for init, data order, noise and replay choices")
    out_dir: str = _f("runs/digits_sspo", "output directory")
    resume: bool = _f(False, "continue from the newest complete checkpoint in out_dir/checkpoints")
    resume_from_checkpoint: str = _f("", "'latest' (= --resume) or a checkpoint: step_N or a path to "
                                     "out_dir/checkpoints/step_N")
    overwrite: bool = _f(False, "a fresh run may clear an out_dir that holds an earlier run")
    keep_checkpoints: int = _f(0, "training-state checkpoints to keep (0 = all)")
    log_every: int = _f(10, "updates between log lines / metrics.jsonl rows")
    sample_every: int = _f(100, "updates between sample grids (0 = only at the end)")
    num_sample_prompts: int = _f(10, "prompts in a sample grid")
    validation_prompts: str = _f("", "sample-grid prompts: a text file (one per line) or prompts "
                                 "separated by '|' ('' = the built-in set)")
    report_to: str = _f("none", "none | tensorboard (out_dir/logs) | wandb (WANDB_MODE=offline works): "
                        "every logged scalar and the sample grids")
    tracker_project_name: str = _f("sspo", "wandb project name")
    save_merged_pipeline: bool = _f(False, "LoRA on sd15/animatediff: also write the merged full pipeline "
                                    "to final/merged (final/ always holds the diffusers-format adapter)")
    init: str = _f("pretrained", "pretrained | scratch (digits only: the base model's own pretraining)")
    data_split: str = _f("align", "digits split to train on: pretrain | align")


# How each user-facing method maps onto loss, data and replay. Applied after the preset file
# and before command-line overrides, so `--method=spin --ssr=sign` still wins over the preset.
METHOD_PRESETS: dict[str, dict] = {
    "sft": {},
    "dpo": {},
    # tau/eps_clip chosen so that masking and clipping both act on a visible share of pairs on
    # the digits model and at SD-1.5's latent shape (weights_report.py -> results/pair_weights.md).
    # SDPO re-weights rather than drops: a lower tau and a wider clip band than DPO-C&M.
    "dpo_cm": {"tau": 0.8, "eps_clip": 0.05},
    "sdpo": {"tau": 0.7, "eps_clip": 0.1},
    "sspo": {"replay": "uniform", "ssr": "sign"},
    "sspo_r": {"replay": "uniform", "ssr": "sign"},
    "spin": {"replay": "last", "ssr": "none"},  # SPIN-Diffusion as compared in the paper
}
LOSS_OF = {"sft": "sft", "dpo": "dpo", "dpo_cm": "dpo_cm", "sdpo": "sdpo",
           "sspo": "sspo", "sspo_r": "sspo", "spin": "sspo"}
DATA_MODE_OF = {"sft": "winners", "sspo": "winners", "spin": "winners", "sspo_r": "random",
                "dpo": "pairs", "dpo_cm": "pairs", "sdpo": "pairs"}
DATA_OF_MODEL = {"digits": ("digits",), "sd15": ("pickapic", "imagefolder"), "sdxl": ("pickapic", "imagefolder"),
                 "animatediff": ("videofolder", "videopairs"), "cogvideox": ("videofolder", "videopairs"),
                 "wan": ("videofolder", "videopairs")}
VIDEO_MODELS = ("animatediff", "cogvideox", "wan")
CHOICES = {
    "method": tuple(METHOD_PRESETS), "ssr": ("sign", "indicator", "none"),
    "replay": ("uniform", "initial", "last"),
    "model": ("digits", "sd15", "animatediff", "sdxl", "cogvideox", "wan"),
    "data": ("digits", "pickapic", "imagefolder", "videofolder", "videopairs"),
    "pool_storage": ("memory", "memory_bf16", "disk"), "mixed_precision": ("no", "bf16", "fp16"),
    "init": ("pretrained", "scratch"), "data_split": ("pretrain", "align"),
    "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine"),
    "report_to": ("none", "tensorboard", "wandb"),
    "loser_scheduler": ("ddim", "dpmsolver++", "unipc", "euler"),  # = sampling.SCHEDULERS
}
# The diffusers training scripts' flag names (train_text_to_image*.py, the Diffusion-DPO example)
# accepted as aliases of this project's keys on the command line.
ALIASES = {
    "pretrained_model_name_or_path": "model_path", "output_dir": "out_dir", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "learning_rate": "lr", "max_train_steps": "max_steps",
    "checkpointing_steps": "save_every", "checkpoints_total_limit": "keep_checkpoints",
    "lr_warmup_steps": "warmup_steps", "adam_weight_decay": "weight_decay", "rank": "lora_rank",
    "beta_dpo": "beta", "train_data_dir": "data_path", "dataloader_num_workers": "num_workers",
    "random_flip": "hflip", "validation_steps": "sample_every", "validation_prompt": "validation_prompts",
}
