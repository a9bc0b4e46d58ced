"""Building and loading the model families, and the few tensor conversions around them.

Families (see DESIGN.md):
- ``digits``: the embedded default. Pixel space (no VAE), 1 channel, 8x8, a ~1M-parameter
  ``UNet2DConditionModel``, a small frozen random-weight ``CLIPTextModel`` and the real CLIP BPE
  tokenizer built offline from open_clip's vocabulary file.
- ``sd15``: Stable Diffusion 1.5 in diffusers' layout, from a local directory or the hub cache
  (``local_files_only`` by default). Latents ``(B,4,H/8,W/8)``.
- ``animatediff``: SD-1.5 plus a ``MotionAdapter`` merged with ``UNetMotionModel.from_unet2d``.
  Latents ``(B,4,F,H/8,W/8)``. Trains the motion modules (or LoRA).

Each conversion lives in one place: ``encode_prompts`` (text -> ``(B,77,D)``), ``encode_pixels``
(pixels -> scaled latents), ``decode_latents`` and ``unet_forward`` (which repeats text
embeddings over frames for video, as diffusers 0.42 expects of the caller).
"""
from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import diffusers
from diffusers import (AutoencoderKL, DDPMScheduler, MotionAdapter, PNDMScheduler,
                       UNet2DConditionModel, UNetMotionModel)

# Loading/saving progress bars of the libraries would drown the training log.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

FAMILIES = ("digits", "sd15", "animatediff")
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MOTION_ADAPTER_REPO = "guoyww/animatediff-motion-adapter-v1-5-3"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DIGITS_SEED = 0

# SD-1.5's training schedule (scheduler/scheduler_config.json of the release); digits uses the
# same DDPM settings so that beta/timestep conventions are shared by every family.
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", prediction_type="epsilon",
                      set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                      timestep_spacing="leading")


@dataclass
class Bundle:
    """Everything a training step needs. Only ``unet`` (or part of it) trains."""
    family: str                  # "digits" | "sd15" | "animatediff"
    unet: nn.Module              # policy: UNet2DConditionModel | UNetMotionModel (maybe with LoRA adapter "default")
    text_encoder: nn.Module      # frozen, eval mode
    tokenizer: Any               # CLIPTokenizer, model_max_length 77
    vae: nn.Module | None        # frozen; None for digits (pixel space)
    scheduler_config: dict       # DDPM settings (num_train_timesteps, beta_*, prediction_type, ...)
    lora: bool                   # True: only the LoRA adapter "default" trains
    num_frames: int              # 0 for images
    train_motion_only: bool = False  # animatediff without LoRA: only motion modules train

    def is_trainable(self, name: str) -> bool:
        """Which UNet parameter names a snapshot holds (the rule is by name, so a second
        peft adapter such as replay's "ref" never counts as trainable)."""
        if self.lora:
            return "lora_" in name and ".default." in name
        if self.train_motion_only:
            return "motion_modules" in name
        return True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.unet.named_parameters() if self.is_trainable(n)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached clones of exactly the trainable weights (what a replay snapshot holds)."""
        return {n: p.detach().clone() for n, p in self.unet.named_parameters() if self.is_trainable(n)}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


# ----------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_bpe_file() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` shipped in the open_clip_torch wheel (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The CLIP BPE vocabulary comes from the open_clip_torch wheel; install it "
                                "without its dependencies: pip install --no-deps open_clip_torch")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall open_clip_torch")
    return path


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary order follows OpenAI's SimpleTokenizer: 256 byte symbols, the same with
    ``</w>``, the 48,894 merges, then the two special tokens = 49,408 ids (SD-1.5's vocab.json)."""
    lines = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {v: i for i, v in enumerate(vocab)}, merges


def load_digits_tokenizer() -> CLIPTokenizer:
    """The real CLIP tokenizer (bos 49406, eos/pad 49407, 77 tokens), built offline."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


# ----------------------------------------------------------------------------- digits

def _digits_unet() -> UNet2DConditionModel:
    # 8x8 -> 4x4 -> 2x2; cross-attention at 8x8 and 4x4 and in the mid block; ~0.95M parameters.
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 48, 48), norm_num_groups=8, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        # The prompt also enters globally: an attention-pooled text vector is added to the time
        # embedding that every ResNet block reads. Cross-attention alone, over a frozen random
        # text encoder, learned to ignore the prompt in this small model.
        addition_embed_type="text", encoder_hid_dim=64, addition_embed_type_num_heads=4)


def _tiny_text_encoder(hidden: int, initializer_factor: float = 1.0) -> CLIPTextModel:
    # Full CLIP vocabulary so that the real tokenizer's ids are all valid.
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=hidden, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        initializer_factor=initializer_factor))


def _fresh_digits() -> tuple[nn.Module, nn.Module]:
    """Seeded random init that leaves the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DIGITS_SEED)
        unet = _digits_unet()
        # A frozen random encoder at CLIP's init scale (0.02) maps "a handwritten digit seven"
        # and "... nine" to nearly the same sequence (cosine 0.99): the UNet then cannot learn to
        # follow prompts. Ten times that scale separates them (cosine ~0.8).
        text_encoder = _tiny_text_encoder(64, initializer_factor=10.0)
    return unet, text_encoder


# ----------------------------------------------------------------------------- sd15 / animatediff

def _layout_help(path: str, what: str) -> str:
    return (
        f"{what}\nExpected the diffusers layout of Stable Diffusion 1.5:\n"
        f"  {path}/model_index.json\n"
        f"  {path}/unet/          config.json + diffusion_pytorch_model.safetensors\n"
        f"  {path}/vae/           config.json + diffusion_pytorch_model.safetensors\n"
        f"  {path}/text_encoder/  config.json + model.safetensors\n"
        f"  {path}/tokenizer/     vocab.json, merges.txt, tokenizer_config.json\n"
        f"  {path}/scheduler/     scheduler_config.json\n"
        "To obtain it (needs a network connection, ~5 GB), on a machine with access:\n"
        f"  huggingface-cli download {SD15_REPO} --local-dir {path} --include model_index.json "
        "'unet/*' 'vae/*' 'text_encoder/*' 'tokenizer/*' 'scheduler/*'\n"
        "or pass --local_files_only=false (train.py) to let diffusers fetch it into the hub cache. To try this code path "
        f"without weights: python -c \"import models; models.write_tiny_sd15('{path}')\"")


def _has_weights(folder: Path, stem: str) -> bool:
    return any(f.name.startswith(stem) and f.suffix in (".safetensors", ".bin") for f in folder.glob("*"))


def _resolve(path: str | None, repo: str, local_files_only: bool, patterns: list[str] | None) -> Path:
    """A local directory as is; otherwise a hub repo id looked up in (or fetched into) the cache."""
    path = path or repo
    if os.path.isdir(path):
        return Path(path)
    if os.sep in path.strip("/") and path.count("/") != 1:  # looks like a filesystem path, not "org/name"
        raise FileNotFoundError(_layout_help(path, f"Model directory '{path}' does not exist."))
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(path, local_files_only=local_files_only, allow_patterns=patterns))
    except Exception as e:  # any hub/cache failure becomes the one readable message below
        raise FileNotFoundError(_layout_help(path, f"'{path}' is neither a directory nor a complete hub cache "
                                             f"entry (local_files_only={local_files_only}): {type(e).__name__}: {e}")) from None


def _check_sd15_layout(root: Path) -> None:
    """All problems at once, so that the user fixes the directory in one go."""
    missing = []
    if not (root / "model_index.json").is_file():
        missing.append("model_index.json")
    for sub, cfg, stem in [("unet", "config.json", "diffusion_pytorch_model"),
                           ("vae", "config.json", "diffusion_pytorch_model"),
                           ("text_encoder", "config.json", "model"),
                           ("tokenizer", "vocab.json", None), ("scheduler", "scheduler_config.json", None)]:
        folder = root / sub
        if not folder.is_dir():
            missing.append(f"{sub}/")
        elif sub == "tokenizer" and (folder / "tokenizer.json").is_file():
            continue  # transformers 5 saves a single tokenizer.json; the release has vocab.json + merges.txt
        elif not (folder / cfg).is_file():
            missing.append(f"{sub}/{cfg}")
        elif stem and not _has_weights(folder, stem):
            missing.append(f"{sub}/{stem}.safetensors")
    if missing:
        raise FileNotFoundError(_layout_help(str(root), f"Incomplete Stable Diffusion 1.5 directory '{root}': "
                                             f"missing {', '.join(missing)}."))


def _load_sd15(path: str | None, local_files_only: bool):
    """(unet, vae, text_encoder, tokenizer, scheduler_config) from diffusers' SD-1.5 layout."""
    root = _resolve(path, SD15_REPO, local_files_only,
                    ["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"])
    _check_sd15_layout(root)
    try:
        unet_cls = json.loads((root / "unet" / "config.json").read_text()).get("_class_name")
        unet_cls = UNetMotionModel if unet_cls == "UNetMotionModel" else UNet2DConditionModel  # saved animatediff
        unet = unet_cls.from_pretrained(root, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
        scheduler_config = dict(PNDMScheduler.load_config(root, subfolder="scheduler"))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(_layout_help(str(root), f"Could not load '{root}' ({type(e).__name__}: {e}).")) from None
    return unet, vae, text_encoder, tokenizer, scheduler_config


def _load_motion_adapter(path: str | None, local_files_only: bool) -> MotionAdapter:
    help_ = (f"Expected a diffusers MotionAdapter directory (config.json + diffusion_pytorch_model.safetensors). "
             f"To obtain one: huggingface-cli download {MOTION_ADAPTER_REPO} --local-dir <dir>; to try the code "
             "path without weights: models.write_tiny_motion_adapter(<dir>).")
    try:
        root = _resolve(path, MOTION_ADAPTER_REPO, local_files_only, None)
    except FileNotFoundError:
        raise FileNotFoundError(f"Motion adapter '{path or MOTION_ADAPTER_REPO}' not found. {help_}") from None
    if not (root / "config.json").is_file() or not _has_weights(root, "diffusion_pytorch_model"):
        raise FileNotFoundError(f"Incomplete motion adapter directory '{root}'. {help_}")
    return MotionAdapter.from_pretrained(root, local_files_only=True)


# ----------------------------------------------------------------------------- build / save

def build_model(family: str, path: str | None = None, *, lora_rank: int = 0, train_motion_only: bool = True,
                gradient_checkpointing: bool = False, local_files_only: bool = True,
                num_frames: int = 16, motion_adapter_path: str | None = None) -> Bundle:
    """Build a ``Bundle``. ``path``: digits -> None (fresh seeded init) or a ``save_model`` dir;
    sd15/animatediff -> a local diffusers directory or a hub repo id (default: the SD-1.5 release).

    ``lora_rank > 0``: freeze the UNet and add a peft LoRA adapter "default" (rank r, alpha r,
    gaussian init, attention projections). Otherwise the full UNet trains, except animatediff
    with ``train_motion_only`` (motion modules only, as AnimateDiff trains them).
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family '{family}'; expected one of {FAMILIES}.")
    vae = None
    if family == "digits":
        if path is None:
            unet, text_encoder = _fresh_digits()
            tokenizer, scheduler_config = load_digits_tokenizer(), dict(SD15_SCHEDULER, _class_name="DDPMScheduler")
        else:
            root = Path(path)
            for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
                if not (root / sub).is_dir():
                    raise FileNotFoundError(f"Digits model directory '{root}' lacks {sub}/ (expected unet/, "
                                            "text_encoder/, tokenizer/, scheduler/ as written by models.save_model).")
            unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
            text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
            scheduler_config = dict(DDPMScheduler.load_config(root, subfolder="scheduler"))
    else:
        unet, vae, text_encoder, tokenizer, scheduler_config = _load_sd15(path, local_files_only)
        if family == "animatediff" and not isinstance(unet, UNetMotionModel):
            adapter = _load_motion_adapter(motion_adapter_path, local_files_only)
            unet = UNetMotionModel.from_unet2d(unet, adapter)
        vae.requires_grad_(False).eval()
    if family != "animatediff" and isinstance(unet, UNetMotionModel):
        raise ValueError(f"'{path}' holds a motion UNet; load it with family='animatediff'.")
    text_encoder.requires_grad_(False).eval()

    motion_only = family == "animatediff" and train_motion_only and lora_rank == 0
    unet.requires_grad_(False)
    if lora_rank > 0:
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS), adapter_name="default")
    bundle = Bundle(family=family, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                    scheduler_config=scheduler_config, lora=lora_rank > 0,
                    num_frames=num_frames if family == "animatediff" else 0, train_motion_only=motion_only)
    for p in bundle.trainable_parameters():
        p.requires_grad_(True)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return bundle


def save_model(bundle: Bundle, path: str) -> None:
    """Write the bundle in diffusers' layout: unet/ (LoRA merged in), text_encoder/, tokenizer/,
    scheduler/, [vae/], model_index.json. ``build_model(bundle.family, path)`` loads it back."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    unet = bundle.unet
    if bundle.lora:  # a plain diffusers UNet that any pipeline loads: merge "default", drop adapters
        unet = copy.deepcopy(unet)
        unet.fuse_lora(adapter_names=["default"])
        unet.unload_lora()
    unet.save_pretrained(root / "unet")
    bundle.text_encoder.save_pretrained(root / "text_encoder")
    bundle.tokenizer.save_pretrained(root / "tokenizer")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(bundle.scheduler_config, indent=2))
    index = {"_class_name": {"sd15": "StableDiffusionPipeline", "animatediff": "AnimateDiffPipeline"}.get(
                 bundle.family, "SSPODigits"),  # digits (pixel space) is no diffusers pipeline: use build_model
             "_diffusers_version": diffusers.__version__, "_sspo_family": bundle.family,
             "unet": ["diffusers", type(unet).__name__], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", bundle.scheduler_config.get("_class_name", "DDPMScheduler")],
             "feature_extractor": [None, None]}
    if bundle.vae is not None:
        bundle.vae.save_pretrained(root / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    if bundle.family == "animatediff":
        index.update(motion_adapter=[None, None], image_encoder=[None, None])
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def write_tiny_sd15(path: str) -> str:
    """Random tiny SD-1.5 stand-in in the real layout (StableDiffusionPipeline.from_pretrained loads it).

    UNet (32,64) channels with cross-attention dim 32, VAE (32,64) -> latent 4 channels at H/2,
    text encoder hidden 32 with the real CLIP tokenizer; a PNDM scheduler config as in the release.
    """
    from diffusers import StableDiffusionPipeline
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16)
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            latent_channels=4, norm_num_groups=16, sample_size=16)
        text_encoder = _tiny_text_encoder(32)
    scheduler = PNDMScheduler(**{k: v for k, v in SD15_SCHEDULER.items() if k not in ("clip_sample",)},
                              skip_prk_steps=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_digits_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    sched = Path(path) / "scheduler" / "scheduler_config.json"  # the release's file also says clip_sample false
    sched.write_text(json.dumps(dict(json.loads(sched.read_text()), clip_sample=False), indent=2))
    # The release's tokenizer/ holds vocab.json + merges.txt (transformers 5 writes tokenizer.json only).
    vocab, merges = _clip_vocab_and_merges()
    (Path(path) / "tokenizer" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (Path(path) / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return str(path)


def write_tiny_motion_adapter(path: str) -> str:
    """Random tiny ``MotionAdapter`` matching ``write_tiny_sd15``'s UNet (2 blocks, 1 layer each),
    no motion mid block (as v1-5-3)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=16,
                                motion_num_attention_heads=2, motion_max_seq_length=32, use_motion_mid_block=False)
    adapter.save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------- conversions

@torch.no_grad()
def encode_prompts(bundle: Bundle, prompts: list[str]) -> torch.Tensor:
    """Prompts (B strings; "" is the unconditional prompt for guidance) -> (B,77,D) last hidden
    state, tokenized exactly as StableDiffusionPipeline does (pad to 77 with eos, truncate)."""
    tok = bundle.tokenizer(list(prompts), padding="max_length", max_length=bundle.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
    device = next(bundle.text_encoder.parameters()).device
    return bundle.text_encoder(tok.input_ids.to(device))[0]  # (B,77,D)


def _vae_scale(bundle: Bundle) -> float:
    return bundle.vae.config.scaling_factor


def _per_frame(x: torch.Tensor, fn, chunk: int) -> torch.Tensor:
    """Apply an image fn to a video (B,C,F,H,W) frame by frame, in chunks of frames."""
    B, _, F = x.shape[:3]
    frames = x.permute(0, 2, 1, 3, 4).reshape(B * F, *x.shape[1:2], *x.shape[3:])  # (B*F,C,H,W)
    out = torch.cat([fn(frames[i:i + chunk]) for i in range(0, B * F, chunk)])
    return out.reshape(B, F, *out.shape[1:]).permute(0, 2, 1, 3, 4)  # (B,C',F,H',W')


@torch.no_grad()
def encode_pixels(bundle: Bundle, x: torch.Tensor, generator: torch.Generator | None = None,
                  chunk: int = 16) -> torch.Tensor:
    """Pixels in [-1,1] -> diffusion-space x0. digits: identity (B,1,8,8). sd15: (B,3,H,W) ->
    (B,4,H/8,W/8) * scaling_factor, a sample of the VAE posterior. Video (B,3,F,H,W) -> (B,4,F,h,w)."""
    if bundle.vae is None:
        return x
    vae = bundle.vae
    x = x.to(device=vae.device, dtype=vae.dtype)
    fn = lambda im: vae.encode(im).latent_dist.sample(generator) * _vae_scale(bundle)
    return _per_frame(x, fn, chunk) if x.ndim == 5 else fn(x)


@torch.no_grad()
def decode_latents(bundle: Bundle, z: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Inverse of ``encode_pixels`` (up to the VAE): latents -> pixels clamped to [-1,1]."""
    if bundle.vae is None:
        return z.clamp(-1, 1)
    vae = bundle.vae
    z = z.to(device=vae.device, dtype=vae.dtype)
    fn = lambda lat: vae.decode(lat / _vae_scale(bundle)).sample
    return (_per_frame(z, fn, chunk) if z.ndim == 5 else fn(z)).clamp(-1, 1)


def unet_forward(bundle: Bundle, unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                 text_emb: torch.Tensor) -> torch.Tensor:
    """One UNet call. x_t (B,C,H,W) or video (B,C,F,H,W); t scalar or (B,); text_emb (B,77,D).
    Returns the prediction (epsilon or v), same shape as x_t.

    diffusers 0.42's UNetMotionModel folds frames into the batch as (B*F) with each item's frames
    consecutive, and expects the caller to repeat the text embeddings the same way (as
    AnimateDiffPipeline does with repeat_interleave).
    """
    if x_t.ndim == 5:
        text_emb = text_emb.repeat_interleave(x_t.shape[2], dim=0)  # (B,77,D) -> (B*F,77,D)
    return unet(x_t, t, encoder_hidden_states=text_emb).sample
