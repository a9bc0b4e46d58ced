"""What the families share: the parts a family hands to models/__init__.py, the CLIP tokenizer built
offline, the hub/cache lookup with one readable error, and the SD-1.5 DDPM settings."""
from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections, as the anchors

# SD-1.5's training schedule (scheduler/scheduler_config.json of the release); digits uses the
# same DDPM settings so that beta/timestep conventions are shared by every family.
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", prediction_type="epsilon",
                      set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                      timestep_spacing="leading")


@dataclass
class Parts:
    """What a family's ``load`` returns; models.build_model makes a Bundle of it."""
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    vae: nn.Module | None
    scheduler_config: dict
    text_encoder_2: nn.Module | None = None  # SDXL's second encoder (CLIPTextModelWithProjection)
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: guidance's unconditional input is zeros


# ----------------------------------------------------------------------------- CLIP tokenizer

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


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary order follows OpenAI's SimpleTokenizer: 256 byte symbols, the same with
    ``</w>``, the 48,894 merges, then the two special tokens = 49,408 ids (SD-1.5's vocab.json)."""
    lines = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {v: i for i, v in enumerate(vocab)}, merges


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP tokenizer (bos 49406, eos/pad 49407, 77 tokens), built offline."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_text_encoder(hidden: int, initializer_factor: float = 1.0, layers: int = 2,
                      with_projection: bool = False) -> CLIPTextModel:
    """A small CLIPTextModel (or CLIPTextModelWithProjection, SDXL's second encoder) with the full
    CLIP vocabulary (so the real tokenizer's ids are valid)."""
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=hidden, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        initializer_factor=initializer_factor))


# ----------------------------------------------------------------------------- finding weights

def has_weights(folder: Path, stem: str) -> bool:
    return any(f.name.startswith(stem) and f.suffix in (".safetensors", ".bin") for f in folder.glob("*"))


def resolve(path: str | None, repo: str, local_files_only: bool, patterns: list[str] | None,
            layout_help: Callable[[str, str], str]) -> Path:
    """A local directory as is; otherwise a hub repo id looked up in (or fetched into) the cache.
    Any failure becomes one FileNotFoundError carrying ``layout_help(path, reason)``."""
    path = path or repo
    if os.path.isdir(path):
        return Path(path)
    if os.sep in path.strip("/") and path.count("/") != 1:  # looks like a filesystem path, not "org/name"
        raise FileNotFoundError(layout_help(path, f"Model directory '{path}' does not exist."))
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(path, local_files_only=local_files_only, allow_patterns=patterns))
    except Exception as e:  # any hub/cache failure becomes the one readable message
        raise FileNotFoundError(layout_help(path, f"'{path}' is neither a directory nor a complete hub cache "
                                            f"entry (local_files_only={local_files_only}): {type(e).__name__}: {e}")) from None


# ----------------------------------------------------------------------------- video transformer families

def tiny_t5_tokenizer():
    """A small SentencePiece-style Unigram T5 tokenizer built offline (no download): the special
    tokens of T5/UMT5 (<pad> 0, </s> 1, <unk> 2), the characters a-z and a few hundred common
    words. A stand-in for tests: the real releases ship their own (32k / 256k pieces)."""
    from transformers import T5Tokenizer
    words = ("a an the of and in on at with to is are by from cat dog man woman girl boy person car bird "
             "fish horse red blue green yellow white black walking running flying swimming dancing "
             "sitting city street sky sea beach forest mountain snow rain night day sun water tree "
             "video slow motion camera close up view digit zero one two three four five six seven "
             "eight nine handwritten").split()
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
             + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"]
             + [("\u2581" + w, -3.0) for w in dict.fromkeys(words)])
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def check_dirs(root: Path, subdirs: dict[str, str], layout_help: Callable[[str, str], str]) -> None:
    """Every ``sub/`` with its config file present, or one FileNotFoundError listing all gaps."""
    missing = [f"{sub}/{cfg}" for sub, cfg in subdirs.items() if not (root / sub / cfg).is_file()]
    if not (root / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if missing:
        raise FileNotFoundError(layout_help(str(root), f"Incomplete model directory '{root}': missing {', '.join(missing)}."))


def save_pipeline_dir(root: Path, pipeline_class: str, parts: dict[str, tuple[Any, str, str]],
                      scheduler_config: dict, diffusers_version: str, family: str) -> None:
    """Write a diffusers pipeline directory: each ``name: (module, library, class)`` with
    save_pretrained into ``root/name``, the scheduler config, and model_index.json."""
    import json
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers_version, "_sspo_family": family}
    for name, (module, library, cls) in parts.items():
        module.save_pretrained(root / name)
        index[name] = [library, cls]
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    index["scheduler"] = ["diffusers", scheduler_config.get("_class_name")]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
