"""Metrics and real-scale scorers: Frechet distance, PSNR, CLIP score, PickScore, LAION
aesthetic score, HPSv2 (scoring/hps.py), ImageReward, CLIP-FID, FVD, and local prompt sets.

FID here is CLIP-FID: the Frechet distance of CLIP image embeddings, not of the Inception-v3
pool features behind published FID numbers (no Inception network is provided: torchvision, which
pytorch-fid / torch-fidelity / clean-fid need, does not import beside this torch), so it is
always printed and written as clip_fid with the CLIP model it used.

Every model-based scorer loads from a LOCAL path (no hub downloads) and raises one
FileNotFoundError / ImportError naming what is missing and the expected layout.
Images are PIL images; videos are float tensors (F,3,H,W) in [0,1] unless stated otherwise.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from scoring.hps import HPSv2Scorer


# ----------------------------------------------------------------------------- pure metrics

def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D,D) of features (N,D), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N>=2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix through its eigen-decomposition."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula):

        ||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2))

    tr((s1 s2)^(1/2)) = sum_i sqrt(lambda_i) with lambda_i the eigenvalues of the symmetric PSD
    matrix sqrt(s1) s2 sqrt(s1) (similar to s1 s2), so no complex sqrtm and no fudge epsilon
    is needed even for singular covariances (fewer samples than dimensions).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _sqrt_psd(s1)
    lam = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(lam, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_from_features(f1, f2) -> float:
    """Frechet distance between two feature sets (N1,D), (N2,D)."""
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def psnr(a, b, data_range: float) -> float:
    """Peak signal-to-noise ratio 10 log10(data_range^2 / MSE) over all elements (inf if equal)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {a.shape} and {b.shape}")
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


# ----------------------------------------------------------------------------- local weights

def require_path(path, what: str, expected: str) -> Path:
    """Return Path(path) if it exists, else raise one readable FileNotFoundError."""
    if path is None or not Path(path).exists():
        raise FileNotFoundError(f"{what}: weights not found at {path!r}. Expected {expected}. "
                                "Scorers load only from local paths; download the weights yourself first.")
    return Path(path)


_CLIP_LAYOUT = "a transformers CLIP directory (config.json, model.safetensors, tokenizer files, preprocessor_config.json)"


class CLIPScorer:
    """CLIP-family scores from a local transformers CLIPModel directory.

    kind="clip": CLIP score = 100 * max(cos(image, text), 0) (the torchmetrics convention).
    kind="pick": PickScore = logit_scale.exp() * cos(image, text) (Kirstain et al. 2023; the
    model is yuvalkirstain/PickScore_v1, its processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K, so
    `processor_path` may differ from `path`).
    """

    def __init__(self, path, kind: str = "clip", processor_path=None, device: str = "cpu"):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
        if kind not in ("clip", "pick"):
            raise ValueError(f"kind must be 'clip' or 'pick', got {kind!r}")
        name = "CLIP score" if kind == "clip" else "PickScore"
        path = require_path(path, f"{name} model", _CLIP_LAYOUT)
        proc = require_path(processor_path or path, f"{name} processor", _CLIP_LAYOUT)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{name} model: no config.json in {path}. Expected {_CLIP_LAYOUT}.")
        self.kind, self.device = kind, device
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(proc, local_files_only=True)
        self.image_processor = CLIPImageProcessor.from_pretrained(proc, local_files_only=True)

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        """L2-normalized projected image embeddings (N, projection_dim)."""
        px = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        out = self.model.get_image_features(pixel_values=px)
        out = out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a ModelOutput
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts) -> torch.Tensor:
        """L2-normalized projected text embeddings (N, projection_dim)."""
        tok = self.tokenizer(list(prompts), padding=True, truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        out = out if torch.is_tensor(out) else out.pooler_output
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, images, prompts) -> np.ndarray:
        """Scores (N,) for N images and their N prompts."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        if self.kind == "clip":
            return (100 * cos.clamp(min=0)).numpy()
        return (self.model.logit_scale.exp().float() * cos).numpy()


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP (sac+logos+ava1-l14-linearMSE.pth); layer
    indices match the published state dict keys (layers.0/2/4/6/7)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb):  # (N,D) -> (N,)
        return self.layers(emb).squeeze(-1)


class AestheticScorer:
    """LAION aesthetic score: L2-normalized CLIP ViT-L/14 image embedding -> published MLP head.
    `clip_path`: local openai/clip-vit-large-patch14 directory; `head_path`: the .pth or
    .safetensors file of the head."""

    def __init__(self, clip_path, head_path, device: str = "cpu"):
        head_path = require_path(head_path, "LAION aesthetic head",
                                 "a .pth or .safetensors file (e.g. sac+logos+ava1-l14-linearMSE.pth)")
        self.clip = CLIPScorer(clip_path, "clip", device=device)
        if head_path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(head_path))
        else:
            state = torch.load(head_path, map_location="cpu", weights_only=True)
        dim = self.clip.model.config.projection_dim
        if "layers.0.weight" not in state or state["layers.0.weight"].shape[1] != dim:
            got = tuple(state["layers.0.weight"].shape) if "layers.0.weight" in state else sorted(state)[:4]
            raise ValueError(f"{head_path}: expected the aesthetic MLP with layers.0.weight of shape (1024, {dim}) "
                             f"to match the CLIP projection dim, got {got}")
        self.head = AestheticHead(dim).eval().to(device)
        self.head.load_state_dict(state)

    @torch.no_grad()
    def __call__(self, images, prompts=None) -> np.ndarray:
        return self.head(self.clip.image_embeds(images)).numpy()


# HPSv2 runs from its local open_clip checkpoint through transformers (scoring/hps.py).

IMAGEREWARD_UNAVAILABLE = (
    "ImageReward not scored: the image-reward package does not import under transformers 5 (its BLIP text "
    "encoder imports apply_chunking_to_forward, which transformers 5 removed) and it needs torchvision; "
    "score ImageReward in a separate environment with transformers 4.x and torchvision")


class ImageRewardScorer:
    """ImageReward through the `image-reward` package (import name ImageReward), local checkpoint.
    Under transformers 5 the package cannot be imported: ``ImportError(IMAGEREWARD_UNAVAILABLE)``."""

    def __init__(self, checkpoint, med_config=None, device: str = "cpu"):
        try:
            import ImageReward as RM
        except Exception as e:  # ImportError from ImageReward itself or from the transformers it imports
            raise ImportError(f"{IMAGEREWARD_UNAVAILABLE} ({type(e).__name__}: {e})") from None
        ckpt = require_path(checkpoint, "ImageReward checkpoint", "a local ImageReward.pt file")
        kw = {"med_config": str(med_config)} if med_config else {}
        self.model = RM.load(str(ckpt), device=device, **kw)

    def __call__(self, images, prompts) -> np.ndarray:
        return np.array([float(self.model.score(p, [img])) for img, p in zip(images, prompts)])


# ----------------------------------------------------------------------------- video metrics

def video_psnr(fake: torch.Tensor, real: torch.Tensor) -> float:
    """Mean over frames of per-frame PSNR; videos (F,3,H,W) in [0,1]."""
    if fake.shape != real.shape:
        raise ValueError(f"video PSNR needs equal shapes, got {tuple(fake.shape)} and {tuple(real.shape)}")
    return float(np.mean([psnr(a.numpy(), b.numpy(), 1.0) for a, b in zip(fake, real)]))


def frames_to_pil(video: torch.Tensor):
    """(F,3,H,W) in [0,1] -> list of PIL images."""
    from PIL import Image
    arr = (video.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def per_frame_clip_score(scorer: CLIPScorer, video: torch.Tensor, prompt: str) -> float:
    """Mean CLIP score of every frame against the video's prompt."""
    frames = frames_to_pil(video)
    return float(scorer(frames, [prompt] * len(frames)).mean())


def clip_fid(scorer: CLIPScorer, fake_images, real_images) -> float:
    """CLIP-FID: FID computed on L2-normalized CLIP image embeddings (not Inception features: state which
    CLIP model when reporting). For videos pass all frames as images."""
    return frechet_distance_from_features(scorer.image_embeds(fake_images).numpy(),
                                          scorer.image_embeds(real_images).numpy())


class FVD:
    """Frechet Video Distance with a local TorchScript I3D (e.g. StyleGAN-V's i3d_torchscript.pt),
    called as detector(x, rescale=False, resize=False, return_features=True) on (B,3,F,224,224)
    clips in [-1,1], as in StyleGAN-V / common-metrics-on-video-quality."""

    def __init__(self, i3d_path, device: str = "cpu"):
        path = require_path(i3d_path, "FVD I3D detector", "a TorchScript file such as i3d_torchscript.pt "
                            "(FVD is only computed when a local I3D checkpoint is given)")
        self.device = device
        self.detector = torch.jit.load(str(path), map_location=device).eval()

    @torch.no_grad()
    def features(self, videos) -> np.ndarray:
        """videos: iterable of (F,3,H,W) in [0,1] -> (N, D) features."""
        feats = []
        for v in videos:
            v = F.interpolate(v.float(), size=(224, 224), mode="bilinear", align_corners=False)  # (F,3,224,224)
            x = (v * 2 - 1).permute(1, 0, 2, 3).unsqueeze(0).to(self.device)  # (1,3,F,224,224)
            feats.append(self.detector(x, rescale=False, resize=False, return_features=True).cpu().numpy())
        return np.concatenate(feats)

    def __call__(self, fake_videos, real_videos) -> float:
        return frechet_distance_from_features(self.features(fake_videos), self.features(real_videos))


def load_video(path) -> torch.Tensor:
    """Read a GIF (PIL) or MP4/WebM/AVI (PyAV) into (F,3,H,W) float in [0,1]."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence
        with Image.open(path) as im:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    elif path.suffix.lower() in (".mp4", ".webm", ".avi", ".mov"):
        import av
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    else:
        raise ValueError(f"{path}: unsupported video format (use .gif, .mp4, .webm, .avi, .mov)")
    if not frames:
        raise ValueError(f"{path}: no frames")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255


# ----------------------------------------------------------------------------- prompt sets

# ----------------------------------------------------------------------------- scoring a generate() output

def _load_items(directory: Path):
    """(kind, items, media) from an `evaluate.py generate` directory (manifest.json + files);
    media are PIL images or videos (F,3,H,W) in [0,1]."""
    from PIL import Image
    path = directory / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: score a directory written by `evaluate.py generate`")
    manifest = json.loads(path.read_text())
    load = load_video if manifest["kind"] == "video" else (lambda p: Image.open(p).convert("RGB"))
    return manifest["kind"], manifest["items"], [load(directory / it["file"]) for it in manifest["items"]]


def _load_reference(directory: Path, stems: list[str], kind: str):
    """Reference media paired with the generated files by file stem (00000.png <-> 00000.*)."""
    from PIL import Image
    files = {p.stem: p for p in Path(directory).iterdir() if p.is_file()}
    missing = [s for s in stems if s not in files]
    if missing:
        raise FileNotFoundError(f"reference {directory}: no file for {len(missing)} generated items, e.g. {missing[0]}.*")
    return [load_video(files[s]) if kind == "video" else Image.open(files[s]).convert("RGB") for s in stems]


def score_generated(directory, *, clip=None, pickscore=None, pickscore_processor=None, aesthetic_clip=None,
                    aesthetic_head=None, hpsv2=None, imagereward=None, reference=None, clip_fid_model=None, i3d=None) -> dict:
    """Score a generate() output with every scorer whose local weights are given. Returns
    {"n", "kind", "mean": {metric: value}, "per_item": [...], "skipped": {scorer: reason}}; set
    metrics (clip_fid, fvd) are in "mean". A scorer that cannot run here (ImageReward under
    transformers 5) prints its one-line reason and is listed under "skipped"; the others still run."""
    directory = Path(directory)
    kind, items, media = _load_items(directory)
    prompts = [it["prompt"] for it in items]
    frames = [frames_to_pil(v) for v in media] if kind == "video" else None
    makers = {"clip_score": (clip, lambda: CLIPScorer(clip, "clip")),
              "pickscore": (pickscore, lambda: CLIPScorer(pickscore, "pick", processor_path=pickscore_processor)),
              "aesthetic": (aesthetic_head, lambda: AestheticScorer(aesthetic_clip or clip, aesthetic_head)),
              "hpsv2": (hpsv2, lambda: HPSv2Scorer(hpsv2)),
              "imagereward": (imagereward, lambda: ImageRewardScorer(imagereward))}
    per_item, skipped = {}, {}
    for name, (given, make) in makers.items():
        if given:
            try:
                s = make()
            except ImportError as e:
                if name != "imagereward":
                    raise
                skipped[name] = str(e)
                print(e, file=sys.stderr)
                continue
            # videos: the mean over frames of the per-frame score
            per_item[name] = ([float(np.mean(s(f, [p] * len(f)))) for f, p in zip(frames, prompts)]
                              if kind == "video" else np.asarray(s(media, prompts), dtype=float).tolist())
    mean = {k: float(np.mean(v)) for k, v in per_item.items()}
    if reference:
        ref = _load_reference(Path(reference), [Path(it["file"]).stem for it in items], kind)
        if kind == "video":
            per_item["psnr"] = [video_psnr(a, b) for a, b in zip(media, ref)]
            mean["psnr"] = float(np.mean(per_item["psnr"]))
        if clip_fid_model:
            flat = (lambda xs: [f for v in xs for f in frames_to_pil(v)]) if kind == "video" else list
            mean["clip_fid"] = clip_fid(CLIPScorer(clip_fid_model), flat(media), flat(ref))
        if i3d:
            mean["fvd"] = FVD(i3d)(media, ref)
    elif clip_fid_model or i3d:
        raise ValueError("CLIP-FID/FVD need --reference (a folder of real images/videos named like the generated files)")
    rows = [{**it, **{k: v[i] for k, v in per_item.items()}} for i, it in enumerate(items)]
    out = {"n": len(items), "kind": kind, "mean": mean, "per_item": rows, "skipped": skipped}
    if clip_fid_model and reference:
        out["clip_fid_model"] = str(clip_fid_model)  # CLIP-FID values depend on this model
    return out
