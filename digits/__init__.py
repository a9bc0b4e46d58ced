"""The embedded task in one place: real 8x8 handwritten digits (sklearn's load_digits), their
captions and splits, the preference pairs and the misaligned base model (the judge and the
evaluation of generated digits: digits/judge.py).

- Data: 1,797 real digits split once (seed 0, stratified) into pretrain / align / eval.
  Captions come from TRAIN_TEMPLATES; HELDOUT_TEMPLATES never train (out-of-distribution prompts).
- The base (``ensure_base``): built here with a plain SFT loop of its own (not the general
  training loop), on the pretrain split with a fraction of captions naming a wrong digit, so that
  it is visibly misaligned as SD-1.5 is relative to Pick-a-Pic winners. Cached under cache_dir.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import models
import sspo
from data import BaseDataset, check_mode, seeded_rng

SPLITS = ("pretrain", "align", "eval")
SPLIT_SEED = 0  # the data split never changes with the training seed: eval digits stay held out
# Purposes, so that different random choices of one seed are independent streams (data/__init__.py uses 3, 4).
_CORRUPT, _TEMPLATE, _LOSER, _SPLIT, _MIX, _DEGRADE = 0, 1, 2, 5, 6, 7
_COIN, _SWAP = 3, 8
LOSER_WRONG = 0.5  # default mix: half the losers show a wrong digit, half the right digit, worse

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Captions used for pretraining and alignment.
TRAIN_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {word}, written by hand",
    "a picture of the digit {word}",
)
# Never used for training: out-of-distribution prompts for evaluation (cf. HPSv2/Parti in the paper).
HELDOUT_TEMPLATES = (
    "a scan of the numeral {word}",
    "someone wrote {word} on paper",
)

def digit_caption(label: int, template: str) -> str:
    """'a handwritten digit {word}' + 7 -> 'a handwritten digit seven'."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"digit label must be 0..9, got {label}")
    if "{word}" not in template:
        raise ValueError(f"caption template {template!r} has no '{{word}}' placeholder")
    return template.format(word=DIGIT_WORDS[int(label)])


@lru_cache(maxsize=None)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)  # (1797,64) in 0..16, (1797,)


def digits_split_indices(seed: int = 0) -> dict[str, np.ndarray]:
    """Indices into ``sklearn.datasets.load_digits()`` for each split, sorted.

    Stratified: within every class, a seeded permutation gives 50% pretrain, 25% align and
    the rest eval, so all splits hold every digit in the same proportions.
    """
    _, y = _digits()
    rng = seeded_rng(seed, _SPLIT)
    parts = {s: [] for s in SPLITS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_pre, n_align = round(0.5 * len(idx)), round(0.25 * len(idx))
        parts["pretrain"].append(idx[:n_pre])
        parts["align"].append(idx[n_pre:n_pre + n_align])
        parts["eval"].append(idx[n_pre + n_align:])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def load_digits_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"pretrain"|"align"|"eval": (x (N,1,8,8) float32 in [-1,1], y (N,) int64)}."""
    data, target = _digits()
    out = {}
    for split, idx in digits_split_indices(seed).items():
        x = torch.from_numpy(data[idx] / 8.0 - 1.0).float().reshape(-1, 1, 8, 8)  # 0..16 -> [-1,1]
        out[split] = (x, torch.from_numpy(target[idx].copy()))
    return out


def real_subset(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` real digits of each class of a split (in split order):
    x (10*per_class,1,8,8) in [-1,1], y (10*per_class,)."""
    x, y = load_digits_splits(SPLIT_SEED)[split]
    keep = _first_per_class(y, per_class)
    return x[keep], y[keep]


def _first_per_class(y: torch.Tensor, per_class: int) -> torch.Tensor:
    """(N,) bool: True for the first ``per_class`` items of each class, in order."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rank = torch.tensor([int((y[:i] == y[i]).sum()) for i in range(len(y))])  # (N,) index within its class
    return rank < per_class


class DigitsDataset(BaseDataset):
    """Captioned 8x8 digits of one split.

    item: {"prompt": str, "x0_w": (1,8,8), "label": int digit shown in x0_w, ["x0_l": (1,8,8)]}

    corrupt_fraction: exactly round(fraction * N) items (chosen by seed, fixed across epochs)
        get a caption naming a wrong digit -- this is how the misaligned base is pretrained.
    classes: keep only these digit classes (e.g. hold classes out of alignment).
    per_class: keep only the first ``per_class`` items of each class (a split small enough to
        memorize; the same items as ``real_subset``).
    Losers ("pairs"/"random") are fixed per item like Pick-a-Pic pairs, of two kinds (Pick-a-Pic
    has both: an image that ignored the prompt, and one that follows it but is liked less):
    - wrong digit (a fraction ``loser_wrong_fraction`` of items): a real image of the whole split
      (not only ``classes``) whose digit differs from both the image's and the caption's digit;
    - right digit, worse (the rest): another real image of the caption's digit, smudged by
      ``degrade_digit`` (Gaussian blur + pixel noise), so it shows the prompted digit less well.
    The split itself always uses ``split_seed`` so that eval never leaks when ``seed`` changes.

    pair_noise: the share of items whose preference is recorded the wrong way round: exactly
        round(pair_noise * N) items, chosen by ``seed`` (a function of (seed, dataset index), so
        every method, process count and resume sees the same ones), have winner and loser
        swapped, for every mode: SFT and SSPO then learn from the swapped "winner" too. This
        models Pick-a-Pic's noisy labels: in the Pick-a-Pic paper (Kirstain et al. 2023) a second
        annotator agrees with the recorded choice 68.0% of the time. If the recorded choice and a
        second annotator each disagree with a latent preference independently at rate p,
        agreement = (1 - p)^2 + p^2 = 0.68 gives p = 0.2, the benchmark's assumption.
    """

    def __init__(self, split: str, mode: str = "winners", corrupt_fraction: float = 0.0,
                 seed: int = 0, classes: Sequence[int] | None = None, cfg_drop: float = 0.0,
                 templates: Sequence[str] = TRAIN_TEMPLATES, split_seed: int = 0,
                 per_class: int | None = None, loser_wrong_fraction: float = LOSER_WRONG,
                 pair_noise: float = 0.0):
        super().__init__(seed, cfg_drop)
        if not 0.0 <= pair_noise <= 1.0:
            raise ValueError(f"pair_noise must be in [0,1], got {pair_noise}")
        if not 0.0 <= loser_wrong_fraction <= 1.0:
            raise ValueError(f"loser_wrong_fraction must be in [0,1], got {loser_wrong_fraction}")
        splits = load_digits_splits(split_seed)
        if split not in splits:
            raise ValueError(f"unknown digits split {split!r}; expected one of {SPLITS}")
        check_mode(mode)
        if not 0.0 <= corrupt_fraction <= 1.0:
            raise ValueError(f"corrupt_fraction must be in [0,1], got {corrupt_fraction}")
        if not templates:
            raise ValueError("templates must hold at least one caption template")
        for t in templates:
            digit_caption(0, t)  # validates the placeholder
        self.mode, self.templates = mode, tuple(templates)
        self.pool_x, self.pool_y = splits[split]  # (M,1,8,8), (M,) loser candidates
        keep = torch.ones(len(self.pool_y), dtype=torch.bool)
        if classes is not None:
            bad = [c for c in classes if not 0 <= int(c) <= 9]
            if bad or not len(classes):
                raise ValueError(f"classes must be a non-empty list of digits 0..9, got {list(classes)}")
            keep = torch.isin(self.pool_y, torch.tensor([int(c) for c in classes]))
        if per_class is not None:  # a small split (memorization): the first per_class of each class
            keep &= _first_per_class(self.pool_y, per_class)
        self.x, self.y = self.pool_x[keep], self.pool_y[keep]  # (N,1,8,8), (N,)
        n = len(self.y)
        y = self.y.numpy()

        rng = seeded_rng(seed, _CORRUPT)
        self.corrupted = np.zeros(n, dtype=bool)
        self.corrupted[rng.choice(n, size=int(round(corrupt_fraction * n)), replace=False)] = True
        # A wrong digit is the true one shifted by 1..9 (mod 10): never equal to the truth.
        self.caption_labels = np.where(self.corrupted, (y + rng.integers(1, 10, n)) % 10, y)
        self.template_ids = seeded_rng(seed, _TEMPLATE).integers(len(self.templates), size=n)

        rng, pool_y = seeded_rng(seed, _LOSER), self.pool_y.numpy()
        own = np.flatnonzero(keep.numpy())  # pool index of each item
        # Drawn for every item whatever the mix, so that the wrong-digit losers do not depend on it.
        wrong_index = np.array([
            rng.choice(np.flatnonzero((pool_y != y[i]) & (pool_y != self.caption_labels[i])))
            for i in range(n)], dtype=np.int64)
        self.loser_wrong = seeded_rng(seed, _MIX).random(n) < loser_wrong_fraction  # (N,) bool
        rng = seeded_rng(seed, _DEGRADE)
        same_index = np.array([
            rng.choice(np.flatnonzero((pool_y == self.caption_labels[i]) & (np.arange(len(pool_y)) != own[i])))
            for i in range(n)], dtype=np.int64)
        self.loser_index = np.where(self.loser_wrong, wrong_index, same_index)
        self.loser_x = self.pool_x[torch.from_numpy(self.loser_index)].clone()  # (N,1,8,8)
        worse = torch.from_numpy(~self.loser_wrong)
        if worse.any():
            self.loser_x[worse] = degrade_digit(self.loser_x[worse],
                                                torch.Generator().manual_seed(int(rng.integers(2**62))))
        self.loser_y = self.pool_y[torch.from_numpy(self.loser_index)]  # the digit each loser shows
        self.coin = seeded_rng(seed, _COIN).random(n) < 0.5  # SSPOr: True -> the winner image
        self.swapped = np.zeros(n, dtype=bool)  # recorded the wrong way round (pair_noise)
        self.swapped[seeded_rng(seed, _SWAP).choice(n, size=int(round(pair_noise * n)), replace=False)] = True

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        text = digit_caption(self.caption_labels[i], self.templates[self.template_ids[i]])
        (x_w, y_w), (x_l, y_l) = (self.x[i], int(self.y[i])), (self.loser_x[i], int(self.loser_y[i]))
        if self.swapped[i]:  # a noisy label: the recorded winner is the worse image
            (x_w, y_w), (x_l, y_l) = (x_l, y_l), (x_w, y_w)
        item = {"prompt": self._prompt(text, self._item_rng(i)), "x0_w": x_w, "label": y_w}
        if self.mode == "pairs":
            item["x0_l"] = x_l
        elif self.mode == "random" and not self.coin[i]:
            item["x0_w"], item["label"] = x_l, y_l
        return item

    def wrong_target_fraction(self) -> float:
        """SSPOr ("random" mode): the share of training targets that show a digit other than the
        one their caption names (the coin picked a wrong-digit loser)."""
        return float((~self.coin & (self.loser_y.numpy() != self.caption_labels)).mean())


def degrade_digit(x: torch.Tensor, generator: torch.Generator, sigma: float = 0.6,
                  noise: float = 0.25) -> torch.Tensor:
    """A worse rendering of the same digit: (N,1,8,8) in [-1,1] -> Gaussian blur (std ``sigma``
    pixels, background-padded) plus Gaussian pixel noise (std ``noise``), clamped to [-1,1]."""
    r = torch.arange(-1, 2, dtype=torch.float32)
    k1 = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = (k1[:, None] * k1[None, :]) / k1.sum() ** 2  # (3,3), sums to 1
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)  # (N,1,10,10), background
    blurred = torch.nn.functional.conv2d(padded, k[None, None])  # (N,1,8,8)
    return (blurred + noise * torch.randn(x.shape, generator=generator)).clamp(-1, 1)




# ---------------------------------------------------------------------------------------------
# The judge
# ---------------------------------------------------------------------------------------------

BASE_VERSION = "v3"  # bump when the recipe below changes: the cache key must change with it


def base_dir(cache_dir: str, steps: int, corrupt: float) -> Path:
    return Path(cache_dir) / f"digits_base_steps{steps}_corrupt{corrupt:g}_{BASE_VERSION}"


def build_base(out: Path, *, steps: int, corrupt: float, seed: int = 0, batch_size: int = 64,
               lr: float = 1e-3, text_lr: float = 1e-3, warmup: int = 50, cfg_drop: float = 0.1,
               read_fraction: float = 0.5) -> Path:
    """Pretrain the digits model from scratch on the pretrain split ([SSPO] eq. 2, epsilon
    target) in two stages over one warm-up + cosine schedule, and write models.save_model's
    layout to ``out`` atomically:

    1. reading (``read_fraction`` of the updates): every caption right; the UNet and the text
       encoder learn together (as CLIP had learned to read before SD-1.5 was trained on it);
    2. the rest: a fraction ``corrupt`` of captions names a wrong digit; the text encoder is
       frozen (as SD-1.5's) and the UNet alone learns a misaligned conditional.
    ``corrupt = 0`` gives the clean base."""
    gen = torch.Generator().manual_seed(seed)
    bundle = models.build_model("digits", None)
    unet, te = bundle.unet, bundle.text_encoder
    opt = torch.optim.AdamW([{"params": list(unet.parameters()), "lr": lr},
                             {"params": list(te.parameters()), "lr": text_lr}], weight_decay=0.0)
    cosine = lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else cosine(s))
    abar = sspo.make_schedule()["alphas_cumprod"]
    read_steps = round(read_fraction * steps)
    for stage, (n, frac) in enumerate(((read_steps, 0.0), (steps - read_steps, corrupt))):
        ds = DigitsDataset("pretrain", corrupt_fraction=frac, seed=seed, cfg_drop=cfg_drop)
        te.requires_grad_(stage == 0).train(stage == 0)
        params = [p for p in list(unet.parameters()) + list(te.parameters()) if p.requires_grad]
        for step in tqdm(range(n), desc=f"digits base, stage {stage + 1}", mininterval=5, disable=None):
            ds.set_epoch(stage * steps + step)
            items = [ds[i] for i in torch.randint(len(ds), (batch_size,), generator=gen).tolist()]
            x0 = torch.stack([it["x0_w"] for it in items])  # (B,1,8,8)
            tok = bundle.tokenizer([it["prompt"] for it in items], padding="max_length", truncation=True,
                                   max_length=bundle.tokenizer.model_max_length, return_tensors="pt")
            with torch.set_grad_enabled(stage == 0):
                text = te(tok.input_ids)[0]  # (B,77,D)
            t = torch.randint(0, abar.numel(), (batch_size,), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            pred = unet(sspo.q_sample(x0, t, eps, abar), t, encoder_hidden_states=text).sample
            loss = sspo.sft_loss(sspo.per_sample_error(pred, eps))[0].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()  # a frozen text encoder has no gradient: AdamW skips it
            sched.step()
            if not sys.stderr.isatty() and ((step + 1) % max(1, n // 10) == 0):  # piped: tqdm is off
                print(f"digits base, stage {stage + 1}: {step + 1}/{n} updates, loss {loss.item():.4f}", flush=True)
    te.requires_grad_(False).eval()  # frozen from here on, as SD-1.5's
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    models.save_model(bundle, str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # atomic: the cache entry appears complete or not at all
    return out


def ensure_base(cache_dir: str, steps: int, corrupt: float, log=print) -> Path:
    """The cached misaligned base, built (once, in this process) if missing."""
    path = base_dir(cache_dir, steps, corrupt)
    if not (path / "model_index.json").exists():
        log(f"building the digits base model ({steps} updates, {corrupt:.0%} wrong captions) -> {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            build_base(path, steps=steps, corrupt=corrupt)
    return path
