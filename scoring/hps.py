"""HPSv2 (Wu et al. 2023, arXiv 2306.09341) from its local checkpoint, without the `hpsv2` or
`open_clip` packages (open_clip needs torchvision; the hpsv2 wheel also replaces the CPU torch).

The HPSv2 checkpoint (HPS_v2_compressed.pt / HPS_v2.1_compressed.pt) is an open_clip ViT-H-14
state dict, ``{"state_dict": {...}}``. ``openclip_to_transformers`` maps it onto a transformers
CLIPModel: the two architectures are the same network (pre-LN residual attention blocks, class
token + ln_pre/ln_post on the vision side, a causal text transformer read at the EOT token, both
projections without bias); only the names differ, and open_clip packs q/k/v into one in_proj.

Score = 100 * cos(image embedding, text embedding): hpsv2.score returns the cosine (~0.27 for
SD-1.5); HPSv2's benchmark and the papers' tables (SSPO Table 1: 23.79 for SD-1.5) print 100x it.
Preprocessing is HPSv2's validation transform: resize the longer side to 224 (bicubic), pad the
shorter one with black to a centred square, OpenAI CLIP mean/std.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_H_14_HEADS = (16, 16)  # (vision, text): open_clip's ViT-H-14.json (width 1280 / head 80; text 16)

_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}


def _block_keys(src: str, dst: str, state: dict, out: dict) -> None:
    """One open_clip ResidualAttentionBlock ``src`` -> one transformers CLIPEncoderLayer ``dst``."""
    for oc, hf in _BLOCK.items():
        for p in ("weight", "bias"):
            out[f"{dst}.{hf}.{p}"] = state[f"{src}.{oc}.{p}"]
    for p in ("weight", "bias"):  # in_proj packs [q; k; v] along dim 0: (3D, D) -> 3 x (D, D)
        q, k, v = state[f"{src}.attn.in_proj_{p}"].chunk(3, dim=0)
        out[f"{dst}.self_attn.q_proj.{p}"], out[f"{dst}.self_attn.k_proj.{p}"], out[f"{dst}.self_attn.v_proj.{p}"] = q, k, v


class _Tracked(dict):
    """A dict that remembers which keys were read (so no source weight is silently dropped)."""

    def __init__(self, d):
        super().__init__(d)
        self.read = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)


def _layers(state: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def openclip_to_transformers(state: dict, heads: tuple[int, int] = VIT_H_14_HEADS):
    """A transformers CLIPModel holding an open_clip CLIP state dict (ViT-H-14 for HPSv2).

    Shapes (widths, depths, patch and image size, vocabulary, context length, projection) are
    read from the tensors; the head counts are not in the state dict, so ``heads`` gives them
    as (vision, text). Raises ValueError naming the missing keys if ``state`` is not open_clip's.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
    need = ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
            "token_embedding.weight", "positional_embedding", "text_projection", "logit_scale"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"not an open_clip CLIP state dict: missing {', '.join(missing)}")
    source, state = state, _Tracked(state)
    conv = state["visual.conv1.weight"]  # (width, 3, patch, patch)
    grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    vision = CLIPVisionConfig(
        hidden_size=conv.shape[0], patch_size=conv.shape[-1], image_size=grid * conv.shape[-1],
        num_hidden_layers=_layers(state, "visual.transformer.resblocks."), num_attention_heads=heads[0],
        intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], hidden_act="gelu",
        projection_dim=state["visual.proj"].shape[1])
    vocab, width = state["token_embedding.weight"].shape
    text = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, max_position_embeddings=state["positional_embedding"].shape[0],
        num_hidden_layers=_layers(state, "transformer.resblocks."), num_attention_heads=heads[1],
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], hidden_act="gelu",
        projection_dim=state["text_projection"].shape[1], bos_token_id=vocab - 2, eos_token_id=vocab - 1,
        pad_token_id=vocab - 1)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                     projection_dim=state["text_projection"].shape[1])
    out = {"logit_scale": state["logit_scale"].reshape(()),
           # open_clip keeps projections as (width, proj) matrices used as x @ proj; nn.Linear stores proj.T
           "visual_projection.weight": state["visual.proj"].t(), "text_projection.weight": state["text_projection"].t(),
           "vision_model.embeddings.patch_embedding.weight": conv,
           "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
           "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
           "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": state["positional_embedding"]}
    for oc, hf in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                   ("ln_final", "text_model.final_layer_norm")):
        for p in ("weight", "bias"):
            out[f"{hf}.{p}"] = state[f"{oc}.{p}"]
    for i in range(vision.num_hidden_layers):
        _block_keys(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}", state, out)
    for i in range(text.num_hidden_layers):
        _block_keys(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", state, out)
    unused = sorted(k for k in source if k not in state.read and k != "attn_mask")
    if unused:  # e.g. layer-scale (ls_1) or attention-pool weights this mapping does not know
        raise ValueError(f"open_clip weights with no place in a transformers CLIPModel: {unused[:4]} ({len(unused)} in all)")
    model = CLIPModel(cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in out.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers, not weights
    if missing or unexpected:
        raise ValueError(f"open_clip -> transformers mapping incomplete: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval().requires_grad_(False)


def hps_pixels(images, size: int) -> torch.Tensor:
    """HPSv2's validation transform on PIL images -> (N,3,size,size): the longer side resized
    to ``size`` (bicubic), black padding centring the image in a square, OpenAI mean/std."""
    from PIL import Image
    out = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        scale = size / max(w, h)
        if scale != 1.0:
            nw, nh = round(w * scale), round(h * scale)
            canvas = Image.new("RGB", (size, size), (0, 0, 0))
            canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
            img = canvas
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1))  # (3,H,W)
    x = torch.stack(out)
    return (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def load_hps_state(path) -> dict:
    """The open_clip state dict inside an HPSv2 checkpoint (.pt read with weights_only=True, or
    .safetensors); a ``module.`` prefix (DDP) is dropped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an arbitrary pickle is never executed
            raise ValueError(f"{path}: not loadable with torch.load(weights_only=True) "
                             f"({type(e).__name__}); re-save its state_dict as .safetensors") from None
    state = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


class HPSv2Scorer:
    """HPSv2 = 100 * cos(image, text) of the HPSv2-tuned open_clip ViT-H-14, from a local
    checkpoint (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt; the same weights hpsv2.score
    loads with ``cp=``). ``heads``: (vision, text) attention heads, ViT-H-14's by default."""

    def __init__(self, checkpoint, heads: tuple[int, int] = VIT_H_14_HEADS, device: str = "cpu"):
        from models.common import clip_tokenizer
        if checkpoint is None or not Path(checkpoint).is_file():
            raise FileNotFoundError(f"HPSv2 checkpoint: weights not found at {str(checkpoint)!r}. Expected a local "
                                    "HPS_v2.1_compressed.pt (hub: xswu/HPSv2); scorers never download.")
        self.device = device
        self.model = openclip_to_transformers(load_hps_state(checkpoint), heads).to(device)
        self.tokenizer = clip_tokenizer()  # open_clip's BPE vocabulary: the same ids as its tokenizer

    @torch.no_grad()
    def __call__(self, images, prompts) -> np.ndarray:
        """Scores (N,) for N PIL images and their N prompts."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        ctx = self.model.config.text_config.max_position_embeddings
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")
        px = hps_pixels(images, self.model.config.vision_config.image_size).to(self.device)
        img = self.model.get_image_features(pixel_values=px)
        txt = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device))  # causal: padding is inert
        img, txt = (o if torch.is_tensor(o) else o.pooler_output for o in (img, txt))
        return (100 * (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)).cpu().numpy()
