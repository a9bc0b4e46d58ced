"""Training configuration: the settings table (``Config``, one typed default with a comment each;
``METHODS``, one record per method), presets, and ``--key=value`` overrides.

Resolution order (later wins): the defaults of ``Config`` < a preset file (``--config=digits`` or
``--config=configs/sd15_pickapic.py``, a module defining ``CONFIG = {...}``) < the method's settings
(``METHODS``) < command-line ``--key=value``. Unknown keys and values of the wrong type
are errors that name the key. The resolved config is saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # ---- what to train
    method: str = _f("sspo", "sft | dpo | spin | sspo | sspo_r | dpo_cm | sdpo (see METHODS)")
    ssr: str = _f("sign", "Self-Sampling Regularization, SSPO eq. 9: sign | indicator | none (ablations)")
    replay: str = _f("uniform", "reference checkpoint drawn from the pool: uniform (RCR) | initial | last")
    model: str = _f("digits", "model family: digits | sd15 | animatediff | sdxl | cogvideox | wan")
    model_path: str = _f("", "local dir or hub id (sd15/animatediff/sdxl/cogvideox/wan); digits: '' = the cached base")
    motion_adapter_path: str = _f("", "animatediff: local dir of the MotionAdapter")
    local_files_only: bool = _f(True, "never reach a model hub (set false to let diffusers download)")
    data: str = _f("digits", "digits | pickapic | imagefolder | videofolder | videopairs (pairs.jsonl)")
    data_path: str = _f("", "local dataset directory (not used for digits); layouts: data/layouts.py")
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
    weight_temperature: float = _f(1.0, "dpo_cm/sdpo: the pair log weight is multiplied by this (w^T); 1 = the "
                                        "ratio's own scale; presets set it per family (results/pair_weights.md)")
    snr_gamma: float = _f(0.0, "min-SNR-gamma loss weighting (diffusers' --snr_gamma; 5 is the paper's value): each "
                               "per-sample error x min(SNR_t, gamma)/SNR_t (eps) or /(SNR_t+1) (v); 0 = off. "
                               "DDPM families only; for preference losses it scales beta per timestep (loop.error)")
    # ---- Random Checkpoint Replay and loser generation (sspo, sspo_r, spin)
    replay_every: int = _f(0, "K, the checkpoint interval of RCR: optimizer updates between replay pool snapshots "
                              "(sspo, sspo_r, spin; a multiple of loser_every). The real-scale presets set it, so that "
                              "--save_every/--checkpointing_steps only save; 0 = save_every (the digits preset)")
    save_every: int = _f(50, "optimizer updates between training checkpoints (saving only; the replay pool "
                             "grows every replay_every)")
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
    lr_scheduler: str = _f("constant_with_warmup", "diffusers.optimization.get_scheduler, every choice: constant | "
                           "constant_with_warmup | linear | cosine | cosine_with_restarts | polynomial | "
                           "piecewise_constant (the decaying ones reach their end at max_steps)")
    num_train_epochs: int = _f(0, "> 0: train this many passes over the data set; sets max_steps "
                               "(updates per epoch = items // (batch_size x processes) // grad_accum)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon (diffusers' --adam_epsilon)")
    use_8bit_adam: bool = _f(False, "bitsandbytes' AdamW8bit instead of torch's AdamW (needs the bitsandbytes package)")
    allow_tf32: bool = _f(False, "let CUDA matmuls and convolutions use TF32 on Ampere or newer GPUs")
    max_grad_norm: float = _f(1.0, "gradient clipping (<= 0 disables)")
    use_ema: bool = _f(False, "keep an exponential moving average of the trained weights (diffusers.training_utils."
                              "EMAModel, in every checkpoint); final/ holds the average")
    ema_decay: float = _f(0.9999, "EMAModel's decay (its warm-up (1 + n) / (10 + n) caps it early on)")
    mixed_precision: str = _f("no", "no | bf16 | fp16 (fp16 uses a GradScaler)")
    gradient_checkpointing: bool = _f(False, "recompute UNet activations in backward")
    lora_rank: int = _f(0, "0 = full fine-tuning (of the UNet, or motion modules); >0 = LoRA rank")
    fsdp: bool = _f(False, "cogvideox/wan full fine-tuning under torchrun: shard the transformer (and its "
                           "reference copy) with PyTorch's FSDP2 fully_shard instead of DDP (models/sharding.py)")
    # ---- data
    resolution: int = _f(512, "image (or frame) side in pixels for every family but digits")
    height: int = _f(0, "cogvideox/wan frame height in px, 0 = resolution (a multiple of 16: VAE 8 x patch 2)")
    width: int = _f(0, "cogvideox/wan frame width in px, 0 = resolution (releases: 480x720 CogVideoX, 480x832 Wan)")
    num_frames: int = _f(16, "frames per clip (animatediff; cogvideox/wan: 4k+1, e.g. 49 / 81)")
    random_crop: bool = _f(False, "random instead of center crop")
    hflip: bool = _f(False, "random horizontal flips")
    cfg_drop: float = _f(0.1, "probability of an empty caption (classifier-free guidance)")
    num_workers: int = _f(0, "DataLoader workers")
    dist_timeout: int = _f(1800, "torchrun: seconds a collective waits for a stopped or hung rank before the "
                           "job fails (init_process_group's timeout; checkpoint writes on rank 0 must fit in it)")
    max_image_pixels: int = _f(64_000_000, "images (and video frames) with more pixels are skipped and counted, "
                               "checked from the file's header before decoding (decompression bombs)")
    # ---- the embedded digits default
    digits_base_steps: int = _f(1000, "updates of the (cached) misaligned base model's pretraining (half of them clean)")
    digits_corrupt: float = _f(0.65, "fraction of pretrain captions naming a wrong digit in the base's second stage")
    digits_loser_wrong: float = _f(0.5, "share of digits preference pairs whose loser shows a wrong digit "
                                        "(the rest: the right digit, smudged)")
    pair_noise: float = _f(0.0, "digits: share of preference pairs recorded the wrong way round (winner and loser "
                               "swapped, keyed by seed and item, for every method); 0.2 models Pick-a-Pic's "
                               "68% annotator agreement (digits.DigitsDataset)")
    digits_classes: str = _f("", "comma-separated digit classes kept in the alignment split ('' = all)")
    digits_align_per_class: int = _f(0, "keep only the first N alignment digits of each class (0 = all; memorization runs)")
    cache_dir: str = _f(str(ROOT / "cache"), "where the digits base model is cached")
    # ---- run
    seed: int = _f(0, "seed for init, data order, noise and replay choices")
    out_dir: str = _f("runs/digits_sspo", "output directory")
    resume: bool = _f(False, "continue from the newest complete checkpoint in out_dir/checkpoints")
    resume_from_checkpoint: str = _f("", "'latest' (= --resume) or a checkpoint: step_N, step_00000N, "
                                     "checkpoint-N (diffusers' name), N, or a path to out_dir/checkpoints/step_N")
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


@dataclass(frozen=True)
class Method:
    """What a ``--method`` means: the loss it trains with, where its winners and losers come from,
    and the settings it brings (applied after the preset file, before the command line, so that
    ``--method=spin --ssr=sign`` still wins).

    loss:    sft | dpo | sspo | dpo_cm | sdpo (sspo.py / importance.py); SPIN-Diffusion is the
             sspo loss with ssr="none" (= Diffusion-DPO against replayed samples)
    winners: "data" (the preferred image of a pair, or a single-image data set) | "random" (SSPOr:
             one image of each pair drawn at random)
    losers:  "none" (SFT) | "data" (the pair's other image) | "replayed" (sampled by a checkpoint
             drawn from the run's own pool, which is also the reference: Random Checkpoint Replay)
    """
    loss: str
    winners: str = "data"
    losers: str = "data"
    settings: dict = field(default_factory=dict)

    @property
    def data_mode(self) -> str:
        """What the data set yields: pairs (winner and loser), winners, or random (SSPOr)."""
        return "pairs" if self.losers == "data" else ("random" if self.winners == "random" else "winners")


METHODS: dict[str, Method] = {
    "sft": Method("sft", losers="none"),
    "dpo": Method("dpo"),
    # tau/eps_clip chosen on the digits model so that masking and clipping both act on a visible
    # share of pairs; the other families reach the same scale through their presets'
    # weight_temperature (research/pair_weights.py -> results/pair_weights.md). SDPO re-weights
    # rather than drops: a lower tau and a wider clip band than DPO-C&M.
    "dpo_cm": Method("dpo_cm", settings={"tau": 0.8, "eps_clip": 0.05}),
    "sdpo": Method("sdpo", settings={"tau": 0.7, "eps_clip": 0.1}),
    "sspo": Method("sspo", losers="replayed", settings={"replay": "uniform", "ssr": "sign"}),
    "sspo_r": Method("sspo", winners="random", losers="replayed", settings={"replay": "uniform", "ssr": "sign"}),
    "spin": Method("sspo", losers="replayed", settings={"replay": "last", "ssr": "none"}),  # as compared in the paper
}
DATA_OF_MODEL = {"digits": ("digits",), "sd15": ("pickapic", "imagefolder"), "sdxl": ("pickapic", "imagefolder"),
                 "animatediff": ("videofolder", "videopairs"), "cogvideox": ("videofolder", "videopairs"),
                 "wan": ("videofolder", "videopairs")}
VIDEO_MODELS = ("animatediff", "cogvideox", "wan")
CHOICES = {
    "method": tuple(METHODS), "ssr": ("sign", "indicator", "none"),
    "replay": ("uniform", "initial", "last"),
    "model": ("digits", "sd15", "animatediff", "sdxl", "cogvideox", "wan"),
    "data": ("digits", "pickapic", "imagefolder", "videofolder", "videopairs"),
    "pool_storage": ("memory", "memory_bf16", "disk"), "mixed_precision": ("no", "bf16", "fp16"),
    "init": ("pretrained", "scratch"), "data_split": ("pretrain", "align"),
    "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                     "piecewise_constant"),  # = diffusers.optimization.SchedulerType
    "report_to": ("none", "tensorboard", "wandb"),
    "loser_scheduler": ("ddim", "dpmsolver++", "unipc", "euler"),  # = models.sampling.SCHEDULERS
}
# The diffusers training scripts' flag names (train_text_to_image*.py, the Diffusion-DPO example)
# accepted as aliases of this project's keys on the command line.
ALIASES = {
    "pretrained_model_name_or_path": "model_path", "output_dir": "out_dir", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "learning_rate": "lr", "max_train_steps": "max_steps",
    "checkpointing_steps": "save_every", "checkpoints_total_limit": "keep_checkpoints",
    "lr_warmup_steps": "warmup_steps", "adam_weight_decay": "weight_decay", "rank": "lora_rank",
    "train_data_dir": "data_path", "dataset_name": "data_path", "dataloader_num_workers": "num_workers",
    "random_flip": "hflip", "validation_steps": "sample_every", "validation_prompt": "validation_prompts",
}
# Aliases whose value converts: the diffusers DPO script's loss is -logsigmoid(beta_dpo * (...)),
# this project's -logsigmoid(-beta/2 * (...)) (sspo.py), so beta = 2 x beta_dpo (2500 -> 5000).
CONVERTED = {"beta_dpo": ("beta", lambda v: repr(2.0 * float(v)))}



def _convert(key: str, raw, typ: str):
    """Convert a command-line string (or a preset value) to the field's type, or fail clearly."""
    try:
        if typ == "bool":
            if isinstance(raw, bool):
                return raw
            s = str(raw).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw) if not isinstance(raw, str) else int(raw, 10)
        if typ == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        return str(raw)
    except ValueError:
        raise ValueError(f"config key {key!r} expects a {typ}, got {raw!r}") from None


def _apply(cfg: Config, updates: dict, source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, raw in updates.items():
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ValueError(f"unknown config key {key!r} from {source}{hint}; "
                             f"`python train.py --help` lists every key")
        typ = fields[key].type if isinstance(fields[key].type, str) else fields[key].type.__name__
        setattr(cfg, key, _convert(key, raw, typ))


def load_preset(name_or_path: str) -> dict:
    """The settings of a preset: ``CONFIG`` of configs/<name>.py (this repository's code), or a
    user's preset file read as data, never executed: a .json object or a .toml table of keys as on
    the command line. A .py path outside configs/ is refused: it would run as Python code."""
    path = Path(name_or_path)
    if not path.suffix:
        path = ROOT / "configs" / f"{name_or_path}.py"
    if not path.is_file():
        known = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
        raise FileNotFoundError(f"config preset {name_or_path!r} not found (looked for {path}); "
                                f"presets: {', '.join(known)}; or a .json / .toml file of settings")
    if path.suffix in (".json", ".toml"):
        try:
            if path.suffix == ".json":
                settings = json.loads(path.read_text(encoding="utf-8"))
            else:
                import tomllib
                settings = tomllib.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
            raise ValueError(f"config preset {path}: not valid {path.suffix[1:].upper()} ({e})") from None
        if not isinstance(settings, dict):
            raise ValueError(f"config preset {path} must hold one object of settings, got {type(settings).__name__}")
        return settings
    if path.suffix != ".py" or path.resolve().parent != (ROOT / "configs").resolve():
        raise ValueError(f"--config={name_or_path}: a preset outside {ROOT / 'configs'} is read as data, never "
                         f"run as code: write its settings as a .json object or a .toml table (keys as on the "
                         f"command line), or add the .py file to configs/ and pass its name")
    spec = importlib.util.spec_from_file_location(f"_preset_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not isinstance(getattr(mod, "CONFIG", None), dict):
        raise ValueError(f"{path} must define a dict named CONFIG")
    return dict(mod.CONFIG)


# The preset a command line without --config starts from, per family, and the family that each
# diffusers pipeline class (model_index.json's "_class_name") belongs to.
FAMILY_PRESET = {"digits": "digits", "sd15": "sd15_pickapic", "sdxl": "sdxl_pickapic",
                 "animatediff": "animatediff_magictime", "cogvideox": "cogvideox_sdpo", "wan": "wan21_sdpo"}
PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl",
                   "AnimateDiffPipeline": "animatediff", "CogVideoXPipeline": "cogvideox", "WanPipeline": "wan"}


def infer_family(model_path: str, motion_adapter_path: str = "") -> str:
    """The family of a local pipeline directory, read from its model_index.json (the pipeline class,
    or the ``_sspo_family`` that models.save_model adds); an SD-1.5 directory with a motion adapter
    is AnimateDiff. Raises ValueError when the directory does not say."""
    index = Path(model_path) / "model_index.json"
    ask = ("name the family with --model=digits|sd15|sdxl|animatediff|cogvideox|wan or a preset "
           "with --config=NAME (configs/README.md)")
    if not index.is_file():
        raise ValueError(f"no --config and no --model: cannot infer the model family, {index} "
                         f"{'does not exist' if not Path(model_path).is_dir() else 'is missing'}; {ask}")
    try:
        meta = json.loads(index.read_text())
    except ValueError:
        raise ValueError(f"no --config and no --model: {index} is not JSON; {ask}") from None
    family = meta.get("_sspo_family") or PIPELINE_FAMILY.get(meta.get("_class_name"))
    if family is None:
        raise ValueError(f"no --config and no --model: {index} names pipeline {meta.get('_class_name')!r}, "
                         f"which no family here trains (known: {', '.join(PIPELINE_FAMILY)}); {ask}")
    return "animatediff" if family == "sd15" and motion_adapter_path else family


def infer_preset(updates: dict) -> str:
    """The preset of a command line that names none: the family's (``--model``, else the one
    ``model_path``'s model_index.json names), announced with one InferredPresetWarning; digits
    when neither is given. ``init=scratch`` is the digits model's own pretraining."""
    if updates.get("init") == "scratch":
        return "digits"
    family = updates.get("model")
    source = f"--model={family}"
    if family is None and updates.get("model_path"):
        family = infer_family(updates["model_path"], updates.get("motion_adapter_path", ""))
        source = f"{Path(updates['model_path']) / 'model_index.json'} (family {family})"
    if family is None or family == "digits":
        return "digits"
    if family not in FAMILY_PRESET:
        raise ValueError(f"config key 'model' must be one of {tuple(FAMILY_PRESET)}, got {family!r}")
    updates.setdefault("model", family)
    preset = FAMILY_PRESET[family]
    warnings.warn(f"no --config: starting from preset {preset} (configs/{preset}.py), from {source}; "
                  f"pass --config to choose another", InferredPresetWarning, stacklevel=3)
    return preset


def parse_args(argv: list[str]) -> dict:
    """``--key=value`` / ``--key value`` / bare ``--flag`` (a bool set to true) -> dict of strings.
    The diffusers scripts' flag names (``ALIASES``) become the project's keys."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: use --key=value")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        key = ALIASES.get(key, key)
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val, i = argv[i + 1], i + 1
            else:
                val = "true"
        if key in CONVERTED:
            name, convert = CONVERTED[key]
            try:
                key, val = name, convert(val)
            except ValueError:
                raise ValueError(f"--{arg[2:].partition('=')[0]} expects a number, got {val!r}") from None
        out[key] = val
        i += 1
    return out


def resolve(overrides: dict | None = None, argv: list[str] | None = None) -> Config:
    """Build the resolved Config from presets, ``overrides`` (a dict) and ``argv`` (strings).

    The preset is ``config`` when given; else, for a command line (``argv`` not None), the one of
    the family that ``--model`` or ``model_path``'s model_index.json names (``infer_preset``);
    else the embedded digits default."""
    updates = dict(overrides or {})
    updates.update(parse_args(list(argv or [])))
    cfg = Config()
    if "config" in updates:
        preset = updates.pop("config")
    elif argv is not None:  # a command line: the family's preset (models/ has the families)
        preset = infer_preset(updates)
    else:
        preset = "digits"  # the embedded default of Python callers that name no preset
    if preset:
        _apply(cfg, load_preset(preset), f"preset {preset}")
    if "method" in updates:
        _apply(cfg, {"method": updates["method"]}, "overrides")
    if cfg.method not in METHODS:
        raise ValueError(f"config key 'method' must be one of {tuple(METHODS)}, got {cfg.method!r}")
    _apply(cfg, METHODS[cfg.method].settings, f"method preset {cfg.method}")
    _apply(cfg, updates, "overrides")
    if cfg.resume_from_checkpoint:
        cfg.resume = True  # "latest" or a chosen checkpoint; prepare_out_dir keeps the run
    validate(cfg)
    check_consistency(cfg)
    for message in ignored_settings(cfg, given=set(updates)):
        warnings.warn(message, IgnoredSettingWarning, stacklevel=2)
    return cfg


def replay_interval(cfg) -> int:
    """K, the updates between replay pool snapshots: replay_every, or save_every where it is 0."""
    return cfg.replay_every or cfg.save_every


INFINITE_OK = ("eps_clip", "max_grad_norm")  # inf = no clipping


def validate_numbers(cfg: Config) -> None:
    """NaN anywhere, inf where it means nothing, out-of-range AdamW betas or corrupt fraction:
    refused with one line naming the field (before they can turn the weights into NaN)."""
    for f in dataclasses.fields(Config):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and v != v:
            raise ValueError(f"config key {f.name!r} must be a number, got nan")
        if isinstance(v, float) and abs(v) == float("inf") and f.name not in INFINITE_OK:
            raise ValueError(f"config key {f.name!r} must be finite, got {v}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ValueError(f"config key {key!r} must be in [0, 1), got {getattr(cfg, key)}")
    for key in ("digits_corrupt", "digits_loser_wrong", "pair_noise", "ema_decay"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ValueError(f"config key {key!r} must be in [0, 1], got {getattr(cfg, key)}")
    if cfg.loser_guidance < 0:
        raise ValueError(f"config key 'loser_guidance' must be >= 0, got {cfg.loser_guidance}")


def validate(cfg: Config) -> None:
    validate_numbers(cfg)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"config key {key!r} must be one of {allowed}, got {getattr(cfg, key)!r}")
    for key in ("max_steps", "batch_size", "grad_accum", "save_every", "loser_steps", "log_every", "loser_every",
                "max_image_pixels", "dist_timeout"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"config key {key!r} must be >= 1, got {getattr(cfg, key)}")
    if cfg.replay_every < 0:
        raise ValueError(f"config key 'replay_every' must be >= 0 (0 = save_every), got {cfg.replay_every}")
    if METHODS[cfg.method].losers == "replayed" and replay_interval(cfg) % cfg.loser_every:  # the pool must not change within a cycle (see loop.update)
        key = "replay_every" if cfg.replay_every else "save_every"
        raise ValueError(f"config key {key!r} ({replay_interval(cfg)}) must be a multiple of "
                         f"'loser_every' ({cfg.loser_every})")
    if cfg.loser_batch < 0:
        raise ValueError(f"config key 'loser_batch' must be >= 0, got {cfg.loser_batch}")
    if not 0.0 <= cfg.cfg_drop < 1.0:
        raise ValueError(f"config key 'cfg_drop' must be in [0, 1), got {cfg.cfg_drop}")
    for key in ("beta", "lr", "adam_epsilon", "resolution", "num_frames", "num_sample_prompts"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"config key {key!r} must be > 0, got {getattr(cfg, key)}")
    if cfg.lr > 1.0:  # AdamW's step is about lr per weight: beyond 1 every weight is noise (1e300 overflows)
        raise ValueError(f"config key 'lr' must be <= 1, got {cfg.lr}")
    for key in ("height", "width", "tau", "eps_clip", "weight_temperature", "warmup_steps", "digits_align_per_class", "keep_checkpoints", "snr_gamma", "weight_decay", "num_workers",
                "max_train_samples"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"config key {key!r} must be >= 0, got {getattr(cfg, key)}")
    if cfg.data not in DATA_OF_MODEL[cfg.model]:
        raise ValueError(f"model {cfg.model!r} trains on data {DATA_OF_MODEL[cfg.model]}, got {cfg.data!r}")
    try:
        classes = [int(c) for c in cfg.digits_classes.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"config key 'digits_classes' must be comma-separated digits, got {cfg.digits_classes!r}") from None
    if any(not 0 <= c <= 9 for c in classes):
        raise ValueError(f"config key 'digits_classes' must hold digits 0-9, got {cfg.digits_classes!r}")
    if cfg.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("use_8bit_adam needs the bitsandbytes package (pip install bitsandbytes, on a CUDA "
                         "machine); or drop --use_8bit_adam")
    if cfg.num_train_epochs < 0 or cfg.adam_epsilon <= 0:
        raise ValueError(f"config keys 'num_train_epochs' (>= 0) and 'adam_epsilon' (> 0) got "
                         f"{cfg.num_train_epochs}, {cfg.adam_epsilon}")
    tracker = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(cfg.report_to)
    if tracker and importlib.util.find_spec(tracker) is None:
        raise ValueError(f"report_to={cfg.report_to} needs the {tracker} package: pip install {tracker} "
                         f"(or --report_to=none)")
    if looks_like_missing_file(cfg.validation_prompts):
        raise ValueError(f"validation_prompts {cfg.validation_prompts!r} looks like a file but does not exist; "
                         f"pass a text file (one prompt per line) or prompts separated by '|'")
    if cfg.data != "digits" and not cfg.data_path:
        raise ValueError(f"data {cfg.data!r} needs --data_path=<local directory>")


PROMPT_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".parquet", ".md", ".lst", ".prompts")


def looks_like_missing_file(value: str) -> bool:
    """A prompts value that names a file (a directory part, or a file suffix, and no '|') which is
    not there: a typo, not prompt text."""
    if not value or "|" in value or Path(value).expanduser().is_file():
        return False
    v = value.strip()
    return (" " not in v and ("/" in v or "\\" in v or v.startswith("~"))) or v.lower().endswith(PROMPT_FILE_SUFFIXES)


class IgnoredSettingWarning(UserWarning):
    """A setting that has no effect for the chosen method, model or data (train.py prints one line)."""


class InferredPresetWarning(IgnoredSettingWarning):
    """The preset a command line without --config starts from, and why (one line, as above)."""


PAIR_DATA = ("digits", "pickapic", "videopairs")  # data sets with a winner and a loser per prompt
NON_SQUARE_MODELS = ("cogvideox", "wan")  # the families that take height/width (trained at 480x720 / 480x832)


def frame_size(cfg: Config) -> tuple[int, int]:
    """(height, width) in pixels of what the run trains and samples: each 0 falls back to resolution."""
    return cfg.height or cfg.resolution, cfg.width or cfg.resolution


def check_consistency(cfg: Config) -> None:
    """Refuse, with one line, settings that contradict each other (rather than run something else)."""
    if METHODS[cfg.method].data_mode in ("pairs", "random") and cfg.data not in PAIR_DATA:
        raise ValueError(f"method {cfg.method!r} trains on preference pairs (data {' or '.join(PAIR_DATA)}); "
                         f"data {cfg.data!r} has winners only: use sft, sspo or spin")
    if cfg.fsdp and cfg.model not in ("cogvideox", "wan"):
        raise ValueError(f"fsdp shards the cogvideox and wan transformers; model {cfg.model!r} trains with DDP "
                         f"(drop --fsdp)")
    if cfg.fsdp and cfg.use_ema:
        raise ValueError("use_ema keeps a full copy of the trained weights per process; with fsdp they are "
                         "sharded: drop --use_ema or --fsdp")
    if cfg.fsdp and cfg.lora_rank > 0:
        raise ValueError("fsdp is for full fine-tuning (a LoRA adapter's weights and moments fit one GPU): "
                         "drop --fsdp or set --lora_rank=0")
    if (cfg.height or cfg.width) and cfg.model not in NON_SQUARE_MODELS:
        raise ValueError(f"height/width set a non-square frame for {' and '.join(NON_SQUARE_MODELS)}; model "
                         f"{cfg.model!r} trains square at --resolution (drop --height/--width)")
    if cfg.snr_gamma and cfg.model == "wan":
        raise ValueError("snr_gamma (min-SNR weighting) is defined for DDPM epsilon / v-prediction losses; "
                         "model 'wan' trains with flow matching: drop --snr_gamma")
    if cfg.init == "scratch" and cfg.model != "digits":
        raise ValueError(f"init='scratch' is the digits model's own pretraining; model {cfg.model!r} "
                         f"starts from model_path")
    if cfg.init == "scratch" and cfg.model_path:
        raise ValueError(f"init='scratch' starts from random weights, but model_path={cfg.model_path!r} "
                         f"is given: drop one of them")


def ignored_settings(cfg: Config, given: set[str] | None = None) -> list[str]:
    """One line per setting that has no effect for this method/model/data, naming it and why.

    Only settings away from their default count, and of those only the keys in ``given`` when
    it is passed (``resolve`` passes the keys of the user's overrides, so that a preset's or a
    method preset's own values never warn).
    """
    method, defaults = METHODS[cfg.method], Config()
    loss, replayed = method.loss, method.losers == "replayed"
    why: dict[str, str] = {}
    if not replayed:
        for key in ("ssr", "replay", "loser_steps", "loser_batch"):
            why[key] = (f"only sspo, sspo_r and spin replay checkpoints and sample losers; {cfg.method} "
                        + ("has no reference" if loss == "sft" else "uses the initial model as reference"))
    elif cfg.grad_accum == 1:
        why["loser_batch"] = "with grad_accum 1 an update has one micro-batch, whose losers are sampled in one call"
    if loss == "sft":
        why["beta"] = "sft has no preference term"
        why["pool_storage"] = "sft keeps no checkpoint pool"
    elif not replayed:
        why["pool_storage"] = (f"{cfg.method} keeps no pool: its reference is the initial model, which the "
                               f"reference network holds from the start")
    if loss not in ("dpo_cm", "sdpo"):
        why["tau"] = why["eps_clip"] = why["weight_temperature"] = f"only dpo_cm and sdpo weight pairs; {cfg.method} does not"
    if cfg.model not in VIDEO_MODELS:
        why["num_frames"] = f"only {', '.join(VIDEO_MODELS)} make videos; {cfg.model} makes images"
    if cfg.model != "animatediff":
        why["motion_adapter_path"] = f"only animatediff has a motion adapter; this run trains {cfg.model}"
    if cfg.data != "videofolder":
        why["magictime_csv"] = f"only data 'videofolder' reads a MagicTime CSV; data is {cfg.data!r}"
    if cfg.data in ("digits", "pickapic", "videopairs"):
        why["caption_column"] = f"data {cfg.data!r} has a fixed caption field"
    if cfg.data in ("digits", "videopairs"):
        for key in ("dataset_split_name", "max_train_samples"):
            why[key] = f"data {cfg.data!r} is read whole" + (" (data_split picks its part)" if cfg.data == "digits" else "")
    if cfg.model != "digits":
        for key in ("digits_base_steps", "digits_corrupt", "digits_classes", "digits_loser_wrong", "pair_noise", "cache_dir",
                    "data_split"):
            why[key] = f"only the digits model uses it; this run trains {cfg.model}"
    else:
        why["resolution"] = "the digits model is 8x8 pixels"
        why["random_crop"] = why["hflip"] = "digits data is not augmented"
        why["data_path"] = why["local_files_only"] = "the digits data and model are built locally"
        if cfg.data_split != "align":
            why["digits_classes"] = "classes filter the align split only"
            why["pair_noise"] = "pair noise swaps the align split's preference pairs only"
        if cfg.init == "scratch" or cfg.model_path:
            why["digits_base_steps"] = "the run starts from " + ("random weights" if cfg.init == "scratch"
                                                                  else "model_path, not the cached base")
    if cfg.height and cfg.width:
        why["resolution"] = f"height and width ({cfg.height}x{cfg.width}) are both set"
    out = [f"setting {key}={getattr(cfg, key)!r} has no effect: {reason}" for key, reason in why.items()
           if getattr(cfg, key) != getattr(defaults, key) and (given is None or key in given)]
    if (replayed and cfg.replay != "initial" and replay_interval(cfg) >= cfg.max_steps
            and (given is None or "replay" in given)):
        out.append(f"setting replay={cfg.replay!r} has no effect: replay_every={replay_interval(cfg)} >= max_steps="
                   f"{cfg.max_steps}, so the pool never holds more than checkpoint 0")
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def help_text() -> str:
    lines = ["usage: [torchrun ...] train.py [--config=PRESET | --config=FILE.json | --config=FILE.toml] [--key=value ...]",
             "", "PRESET: a name in configs/ (Python in this repository); a user's FILE is read as data, never run", "",
             "keys:"]
    for f in dataclasses.fields(Config):
        lines.append(f"  --{f.name}={f.default!r:<24} {f.metadata['help']}")
    lines += ["", "aliases (diffusers training scripts): " + ", ".join(f"--{a} = --{k}" for a, k in ALIASES.items())
              + ", --beta_dpo=X = --beta=2X (diffusers' DPO loss has no 1/2)"]
    lines += ["", "methods: " + "; ".join(f"{n} = {m}" for n, m in METHODS.items())]
    return "\n".join(lines)
