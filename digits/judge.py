"""Judging generated digits (the embedded task's evaluation; data and base model: digits.py).

The judge (``DigitsJudge``): a scikit-learn classifier fitted on real digits
  (pixels -> PCA(32) -> RBF SVC, probabilities calibrated with 5-fold CV, sklearn default
  hyperparameters, never tuned). Metrics on N generated digits with prompted labels y:
    accuracy   = mean[judge class == y]       (prompt alignment)
    confidence = mean[p_judge(y | x)]
    frechet    = Frechet distance between generated and real eval digits in the judge's PCA space.
"""
from __future__ import annotations

import numpy as np
import torch

import models
from models import sampling
from digits import (DIGIT_WORDS, HELDOUT_TEMPLATES, SPLIT_SEED, TRAIN_TEMPLATES, digit_caption,
                    load_digits_splits)
from scoring.scorers import frechet_distance, gaussian_stats


def _flat(x) -> np.ndarray:
    """(N,1,8,8) tensor/array in [-1,1] -> (N,64) float64, clipped to the image range."""
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    return np.clip(x.reshape(len(x), -1).astype(np.float64), -1, 1)


class DigitsJudge:
    """sklearn classifier on real digits; scores generated digits against prompted labels."""

    def __init__(self, x_train, y_train, x_ref, n_components: int = 32):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.decomposition import PCA
        from sklearn.pipeline import make_pipeline
        from sklearn.svm import SVC
        y_train = np.asarray(y_train)
        if set(np.unique(y_train)) != set(range(10)):
            raise ValueError(f"judge training labels must cover digits 0..9, got {sorted(set(y_train))}")
        # Raw pixels (all already in [-1,1]), not per-pixel standardisation: border pixels are
        # constant in real digits, and dividing by their ~0 spread turns any faint value a
        # generator puts there into a huge feature that decides the class on its own.
        self.clf = make_pipeline(PCA(n_components, random_state=0),
                                 CalibratedClassifierCV(SVC(), ensemble=False))
        self.clf.fit(_flat(x_train), y_train)
        self.ref_stats = gaussian_stats(self.features(x_ref))  # real eval digits

    @classmethod
    def from_splits(cls, splits: dict | None = None, ref_split: str = "eval") -> "DigitsJudge":
        """Fit on pretrain + align (load_digits_splits layout); the Frechet reference is the
        ``ref_split`` digits (eval: held out; align: for validation, so that eval stays unseen);
        `self.real_accuracy` is the judge's own accuracy on the held-out eval digits."""
        splits = splits or load_digits_splits(SPLIT_SEED)
        x = torch.cat([splits["pretrain"][0], splits["align"][0]])
        y = torch.cat([splits["pretrain"][1], splits["align"][1]])
        judge = cls(x, y.numpy(), splits[ref_split][0])
        judge.real_accuracy = judge.score(*splits["eval"])["accuracy"]
        return judge

    def features(self, x) -> np.ndarray:
        """(N,1,8,8) -> (N,32): the PCA features the SVC reads."""
        return self.clf[:-1].transform(_flat(x))

    def predict_proba(self, x) -> np.ndarray:
        return self.clf.predict_proba(_flat(x))  # (N,10), columns = digits 0..9

    def score(self, x, labels) -> dict:
        """accuracy, confidence (mean p of the prompted digit), frechet (vs real eval digits)."""
        labels = np.asarray(labels)
        p = self.predict_proba(x)
        return {"accuracy": float((p.argmax(1) == labels).mean()),
                "confidence": float(p[np.arange(len(labels)), labels].mean()),
                "frechet": frechet_distance(*gaussian_stats(self.features(x)), *self.ref_stats)}


def second_judge():
    """An independent check of the judge, never used for tuning anything: a RandomForest on raw
    pixels (another model family than the SVC), fitted on the same real pretrain + align digits.
    Returns ``predict(x) -> (N,) labels`` for (N,1,8,8) digits in [-1,1]."""
    from sklearn.ensemble import RandomForestClassifier
    splits = load_digits_splits(SPLIT_SEED)
    x = torch.cat([splits["pretrain"][0], splits["align"][0]])
    y = torch.cat([splits["pretrain"][1], splits["align"][1]])
    rf = RandomForestClassifier(n_estimators=200, random_state=0, n_jobs=1).fit(_flat(x), y.numpy())
    return lambda samples: rf.predict(_flat(samples))


# ---------------------------------------------------------------------------------------------
# Generating and judging digits
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_digits(bundle, prompts, *, guidance_scale: float = 3.0, num_inference_steps: int = 20,
                    seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """Sample digits (N,1,8,8) in [-1,1] with sampling.sample run by the model itself (equal to
    StableDiffusionPipeline(output_type="latent") in pixel space). One generator seeded by `seed`
    draws all initial noise, so every method is judged on the same noise (common random
    numbers). Small batches: on CPU this UNet's cost per sample grows with batch beyond ~100."""
    shape = models.latent_shape(bundle, 0)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        z = torch.randn((len(chunk), *shape), generator=generator)  # (B,1,8,8)
        out.append(sampling.sample_with_policy(bundle, chunk, num_inference_steps=num_inference_steps,
                                               guidance_scale=guidance_scale, latent_shape=shape,
                                               latents=z).clamp(-1, 1))
    return torch.cat(out)


def digit_prompts(templates, n_per_condition: int) -> tuple[list[str], list[int]]:
    """About n_per_condition prompts, balanced over templates x digits 0..9, and their labels."""
    k = max(1, -(-n_per_condition // (len(templates) * len(DIGIT_WORDS))))  # ceil
    labels = [d for _ in templates for d in range(len(DIGIT_WORDS)) for _ in range(k)]
    prompts = [digit_caption(d, t) for t in templates for d in range(len(DIGIT_WORDS)) for _ in range(k)]
    return prompts, labels


def evaluate_model(bundle, judge, *, n_per_condition: int, num_inference_steps: int, seed: int,
                   guidance_scale: float = 3.0, conditions=("id_cfg", "id_nocfg", "ood_cfg", "ood_nocfg")) -> dict:
    """Judge metrics per condition: id = training caption templates, ood = held-out templates;
    cfg = guidance `guidance_scale`, nocfg = none. Keys like "ood_nocfg/accuracy"."""
    res = {}
    for cond in conditions:
        split, g = cond.split("_")
        prompts, labels = digit_prompts(TRAIN_TEMPLATES if split == "id" else HELDOUT_TEMPLATES, n_per_condition)
        x = generate_digits(bundle, prompts, guidance_scale=guidance_scale if g == "cfg" else 1.0,
                            num_inference_steps=num_inference_steps, seed=seed)
        res.update({f"{cond}/{k}": v for k, v in judge.score(x, labels).items()})
    return res


# ---------------------------------------------------------------------------------------------
# The misaligned base model
# ---------------------------------------------------------------------------------------------
