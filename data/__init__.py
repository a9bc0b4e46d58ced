"""Real data sets and collation: Pick-a-Pic v2 pairs and image folders (videos: data/video.py;
the embedded digits set: digits.py; the on-disk layouts each accepts: data/layouts.py).

Every dataset yields dicts ``{"prompt": str, "x0_w": tensor[, "x0_l": tensor][, "label": int]}``
with pixels float32 in [-1, 1]: images ``(3,R,R)``, videos ``(3,F,R,R)``, digits ``(1,8,8)``.
Image items also say where each image came from, for SDXL's size/crop conditioning:
``original_size`` = (h, w) before resizing and ``crop_top_left`` = (top, left) of the crop in the
resized image (of the flipped image when flipped), ``..._l`` for ``x0_l``; collated to (B,2).
``collate`` stacks them into a batch and drops ``None`` items (unreadable files, already logged).

Modes (what a training method consumes):
    "winners"  the preferred image only                     (SFT, SPIN, SSPO)
    "pairs"    winner ``x0_w`` and loser ``x0_l``           (Diffusion-DPO and friends)
    "random"   one image of each pair, chosen by a seeded coin fixed per item (SSPOr)

Determinism: every random choice is drawn from ``np.random.default_rng([seed, purpose, ...])``.
Choices that define the data set itself (wrong captions, losers, SSPOr coins, templates) are
fixed per item; augmentation and the classifier-free-guidance caption drop depend on
(seed, epoch, index), where the epoch comes from ``dataset.set_epoch(epoch)``. Call it (next to
``sampler.set_epoch``) before creating the DataLoader iterator: non-persistent workers are
re-created per epoch and see the new value; ``persistent_workers=True`` workers would not.

Bad input: foreseeable problems at construction (missing directory/file/column, unknown mode)
raise one readable ValueError/FileNotFoundError. Items that cannot be decoded at load time are
logged (file, row, reason, running count), counted in ``dataset.num_skipped`` and returned as
``None``; once more than ``max_bad_fraction`` of the distinct items fetched (counting at least
100) are bad, ``TooManyBadItems`` stops the run, naming the count, the budget and the first
files. A bad item met again in a later epoch is not counted again. Counters are per process
(per DataLoader worker, and so per epoch when workers are re-created).

Refused before reading, skipped and counted as unreadable items are: a file whose resolved path
(``..``, an absolute path, a symlink) lies outside the data folder, and an image or video frame of
more than ``max_image_pixels`` pixels (read from its header, before decoding: a decompression bomb
costs nothing).
"""
from __future__ import annotations

import io
import itertools
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from data.layouts import find_pickapic, read_captions

log = logging.getLogger(__name__)

MODES = ("winners", "pairs", "random")
# Purposes, so that different random choices of one seed are independent streams.
_COIN, _ITEM = 3, 4  # digits.py uses 0, 1, 2 and 5
_MIN_SEEN = 100  # the bad-item fraction is taken over at least this many fetches
MAX_IMAGE_PIXELS = 64_000_000  # an 8000 x 8000 photo; Pick-a-Pic's images are about 1 Mpx


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**63, *(int(k) for k in keys)])


class Refused(Exception):
    """An item refused before it is read (outside the data folder, or over the pixel cap)."""


def confined(root, name: str) -> Path:
    """``root / name`` if its resolved path (``..``, absolute names and symlinks followed) lies
    inside the resolved ``root``; else Refused."""
    path = Path(root) / name
    real, base = path.resolve(), Path(root).resolve()
    if not real.is_relative_to(base):
        raise Refused(f"outside the data folder {base} (resolves to {real})")
    return path


def check_pixels(width: int, height: int, cap: int) -> None:
    if width * height > cap:
        raise Refused(f"{width}x{height} = {width * height / 1e6:.1f} Mpx, over max_image_pixels={cap}")


def open_image(source, cap: int) -> Image.Image:
    """A decoded PIL image, its size checked against ``cap`` from the header before decoding."""
    with warnings.catch_warnings():  # PIL's own bomb warning: our cap decides, with a skip line
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(source)
        check_pixels(*img.size, cap)
        img.load()
    return img


class TooManyBadItems(RuntimeError):
    """More unreadable items than the bad-item budget allows (train.py: one line, exit code 2)."""


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


# ---------------------------------------------------------------------------------------------
# Transforms (as the Diffusion-DPO release: resize shorter side, center/random crop, hflip, [-1,1])

def _plan_crop(width: int, height: int, resolution: int | tuple[int, int], random_crop: bool, hflip: bool,
               rng: np.random.Generator) -> tuple[tuple[int, int], tuple[int, int, int, int], bool]:
    """Resize size (w,h), crop box (l,t,r,b), flip flag for a crop of ``resolution`` pixels square,
    or (out_h, out_w). The resize is the smallest that covers the crop (for a square: the shorter
    side = resolution). Planned once so every frame of a video gets the same geometry."""
    out_h, out_w = (resolution, resolution) if isinstance(resolution, int) else resolution
    scale = max(out_w / width, out_h / height)
    w, h = max(out_w, round(width * scale)), max(out_h, round(height * scale))
    if random_crop:
        left, top = int(rng.integers(0, w - out_w + 1)), int(rng.integers(0, h - out_h + 1))
    else:  # same rounding as torchvision's CenterCrop
        left, top = int(round((w - out_w) / 2)), int(round((h - out_h) / 2))
    flip = bool(hflip and rng.random() < 0.5)
    return (w, h), (left, top, left + out_w, top + out_h), flip


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB by its real range: 16-bit grayscale ("I;16*", or "I" as PIL
    opens 16-bit PNGs) is scaled by 255/65535 (PIL's own convert clips it to 255, all white)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def _apply_crop(img: Image.Image, plan) -> torch.Tensor:
    """PIL image -> (3,H,W) float32 in [-1,1] (H = W = R for a square crop)."""
    size, box, flip = plan
    img = to_rgb(img)
    if img.size != size:
        img = img.resize(size, Image.BILINEAR)
    img = img.crop(box)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # (H,W,3) in 0..255
    return x.permute(2, 0, 1) / 127.5 - 1.0  # (3,H,W)


class BaseDataset(Dataset):
    """Seed/epoch bookkeeping, caption drop for CFG, transforms, counting of skipped items."""

    def __init__(self, seed: int, cfg_drop: float, max_bad_fraction: float = 0.01,
                 resolution: int = 0, random_crop: bool = False, hflip: bool = False,
                 height: int = 0, width: int = 0, max_image_pixels: int = MAX_IMAGE_PIXELS):
        if not 0.0 <= cfg_drop <= 1.0:
            raise ValueError(f"cfg_drop must be in [0,1], got {cfg_drop}")
        self.max_image_pixels = int(max_image_pixels)
        self.seed, self.cfg_drop, self.epoch = int(seed), float(cfg_drop), 0
        self.resolution, self.random_crop, self.hflip = resolution, random_crop, hflip
        self.size = (height or resolution, width or resolution)  # (H, W) of the crop; 0 = resolution
        self.max_bad_fraction = float(max_bad_fraction)
        self.num_seen = 0     # item fetches in this process
        self.num_skipped = 0  # of which unreadable (returned None)
        self.bad: list[str] = []  # distinct unreadable items, in the order met
        self._bad_set: set[str] = set()
        self._fetched: np.ndarray | None = None  # which indices were fetched at least once
        self.num_distinct = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the augmentation / caption-drop draws of this epoch."""
        self.epoch = int(epoch)

    def _item_rng(self, index: int) -> np.random.Generator:
        return seeded_rng(self.seed, _ITEM, self.epoch, index)

    def _prompt(self, text: str, rng: np.random.Generator) -> str:
        # Empty prompt with probability cfg_drop: trains the unconditional branch for CFG.
        return "" if rng.random() < self.cfg_drop else text

    def _transform(self, images: list[Image.Image], rng: np.random.Generator) -> torch.Tensor:
        """N images (or frames of one clip) -> (N,3,H,W), all with the same resize/crop/flip."""
        return self._transform_with_geometry(images, rng)[0]

    def _transform_with_geometry(self, images: list[Image.Image], rng: np.random.Generator,
                                 suffix: str = "") -> tuple[torch.Tensor, dict]:
        """``_transform`` and the geometry SDXL conditions on, as SDXL's training computes it:
        {"original_size" + suffix: (h, w) before resizing, "crop_top_left" + suffix: (top, left)
        of the crop in the resized image, mirrored when the image is flipped}."""
        width, height = images[0].size
        plan = _plan_crop(width, height, self.size, self.random_crop, self.hflip, rng)
        (w, _), (left, top, right, _), flip = plan
        geometry = {"original_size" + suffix: (height, width),
                    "crop_top_left" + suffix: (top, w - right if flip else left)}
        return torch.stack([_apply_crop(img, plan) for img in images]), geometry

    def _fetch(self, index: int) -> None:
        """Count a fetch of item ``index`` (distinct items counted once, whatever the epoch)."""
        self.num_seen += 1
        if self._fetched is None:
            self._fetched = np.zeros(len(self), dtype=bool)
        if not self._fetched[index]:
            self._fetched[index] = True
            self.num_distinct += 1

    def _skip(self, where: str, why: str) -> None:
        """Count (once per distinct item) and log an unreadable item; stop once more than
        max_bad_fraction of the distinct items fetched (at least 100 counted) are bad."""
        self.num_skipped += 1
        if where in self._bad_set:
            return None  # met again in a later epoch: logged and counted already
        self._bad_set.add(where)
        self.bad.append(where)
        log.warning("skipping %s: %s (%d of %d distinct items unreadable so far)",
                    where, why, len(self.bad), self.num_distinct)
        budget = self.max_bad_fraction * max(self.num_distinct, _MIN_SEEN)
        if len(self.bad) > budget:
            raise TooManyBadItems(
                f"too many unreadable items: {len(self.bad)} of {self.num_distinct} distinct items "
                f"fetched, over the budget of {budget:g} (max_bad_fraction={self.max_bad_fraction}); "
                f"first: {'; '.join(self.bad[:3])}; last: {where}: {why}")
        return None


# ---------------------------------------------------------------------------------------------
# Pick-a-Pic v2 (parquet shards, read lazily)

class PickAPicDataset(BaseDataset):
    """Pick-a-Pic v2 pairs of one split (the published schema), from any layout in
    ``data_layouts.PICKAPIC_LAYOUTS``: the hub snapshot, its ``data/`` folder of parquet shards,
    or a ``datasets`` ``save_to_disk`` directory.

    Only ``caption`` and ``label_0`` are read up front (column projection); image bytes are read
    one block (parquet row group, or memory-mapped Arrow file) at a time when an item needs them,
    so a 335 GB set costs only the index.
    Ties (label_0 == 0.5) are dropped and counted in ``num_ties``; rows with another label are
    dropped and counted in ``num_unlabeled``; empty captions are kept and counted in
    ``num_empty_captions``. The winner is jpg_0 if label_0 == 1 else jpg_1. ``max_train_samples``
    (> 0) keeps the first N pairs after that filtering, in shard order.

    item: {"prompt": str, "x0_w": (3,R,R)[, "x0_l": (3,R,R)]}, or None if an image is unreadable.
    """
    COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")

    def __init__(self, root, mode: str = "pairs", resolution: int = 512, random_crop: bool = False,
                 hflip: bool = False, cfg_drop: float = 0.0, seed: int = 0,
                 max_bad_fraction: float = 0.01, split: str = "train", max_train_samples: int = 0,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        super().__init__(seed, cfg_drop, max_bad_fraction, resolution, random_crop, hflip,
                         max_image_pixels=max_image_pixels)
        check_mode(mode)
        self.files = find_pickapic(root, split)  # [Shard], in order
        self.mode = mode
        self.num_ties = self.num_unlabeled = self.num_empty_captions = 0
        file_ids, rows, winners, self.captions = [], [], [], []
        import pyarrow as pa  # here, not at module import: training images or digits need no Arrow
        for f, shard in enumerate(self.files):
            missing = [c for c in self.COLUMNS if c not in shard.names]
            if missing:
                raise ValueError(f"{shard}: missing column(s) {missing}; Pick-a-Pic v2 shards need "
                                 f"{list(self.COLUMNS)}, found {shard.names}")
            try:
                table = shard.read(["caption", "label_0"])
                label = table["label_0"].cast(pa.float64()).to_numpy()  # nulls -> nan
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{shard}: cannot read 'caption'/'label_0' as text/number ({e})") from e
            if not (pa.types.is_string(table["caption"].type) or pa.types.is_large_string(table["caption"].type)
                    or pa.types.is_null(table["caption"].type)):
                raise ValueError(f"{shard}: column 'caption' holds {table['caption'].type}, "
                                 f"Pick-a-Pic v2 captions are strings")
            tie, valid = label == 0.5, (label == 0.0) | (label == 1.0)
            self.num_ties += int(tie.sum())
            self.num_unlabeled += int((~tie & ~valid).sum())
            keep = np.flatnonzero(valid)
            caps = table["caption"].to_pylist()
            self.captions += [caps[r] or "" for r in keep]  # kept: they act like CFG drops
            self.num_empty_captions += sum(not caps[r] or not caps[r].strip() for r in keep)
            file_ids.append(np.full(len(keep), f, dtype=np.int32))
            rows.append(keep)
            winners.append(np.where(label[keep] == 1.0, 0, 1).astype(np.int8))  # 0 -> jpg_0 wins
        self.file_ids, self.rows = np.concatenate(file_ids), np.concatenate(rows)
        self.winner = np.concatenate(winners)
        if len(self.rows) == 0:
            raise ValueError(f"{root}: no labelled, non-tie pairs in {len(self.files)} shard(s)")
        if max_train_samples > 0:  # the first N after dropping ties, as diffusers' --max_train_samples
            self.file_ids, self.rows = self.file_ids[:max_train_samples], self.rows[:max_train_samples]
            self.winner, self.captions = self.winner[:max_train_samples], self.captions[:max_train_samples]
        self.coin = seeded_rng(seed, _COIN).random(len(self.rows)) < 0.5  # SSPOr: True -> the winner
        self._cache_key, self._cache = None, None
        log.info("Pick-a-Pic %s (%s): %d pairs from %d shard(s); dropped %d ties, %d unlabelled; "
                 "%d empty captions", root, split, len(self.rows), len(self.files), self.num_ties,
                 self.num_unlabeled, self.num_empty_captions)

    def __getstate__(self):  # the block cache stays in its own process (shards drop their handles)
        return {**self.__dict__, "_cache_key": None, "_cache": None}

    def __len__(self) -> int:
        return len(self.rows)

    def _image_bytes(self, f: int, row: int, column: str) -> bytes:
        starts = self.files[f].starts
        g = int(np.searchsorted(starts, row, side="right") - 1)
        if self._cache_key != (f, g):  # consecutive items usually share a block
            self._cache = self.files[f].block(g, ["jpg_0", "jpg_1"])
            self._cache_key = (f, g)
        value = self._cache[column][row - starts[g]].as_py()
        return value["bytes"] if isinstance(value, dict) else value  # HF Image struct or raw bytes

    def __getitem__(self, i: int) -> dict | None:
        self._fetch(i)
        f, row, rng = int(self.file_ids[i]), int(self.rows[i]), self._item_rng(i)
        w = int(self.winner[i])
        wanted = {"pairs": [w, 1 - w], "winners": [w], "random": [w if self.coin[i] else 1 - w]}
        item = {"prompt": self._prompt(self.captions[i], rng)}
        for key, k in zip(("x0_w", "x0_l"), wanted[self.mode]):
            column = f"jpg_{k}"
            try:
                img = open_image(io.BytesIO(self._image_bytes(f, row, column)), self.max_image_pixels)
            except Refused as e:
                return self._skip(f"{self.files[f]} row {row} column {column}", f"refused: {e}")
            except Exception as e:  # PIL raises several types for broken files
                return self._skip(f"{self.files[f]} row {row} column {column}",
                                  f"unreadable image ({type(e).__name__}: {e})")
            x, geometry = self._transform_with_geometry([img], rng, suffix="_l" if key == "x0_l" else "")
            item.update(geometry)  # original_size, crop_top_left (x0_w); ..._l (x0_l)
            item[key] = x[0]  # (3,R,R)
        return item


# ---------------------------------------------------------------------------------------------
# Image folders

class ImageFolderDataset(BaseDataset):
    """Captioned images in the ``datasets`` imagefolder layout (``data_layouts.read_captions``):
    ``metadata.jsonl`` or ``metadata.csv`` in ``root`` or ``root/{split}``, with ``file_name``
    (relative to the metadata file) and the caption column. ``max_train_samples`` > 0 keeps the
    first N entries.

    item: {"prompt": str, "x0_w": (3,R,R)}, or None if the file is missing/unreadable.
    """

    def __init__(self, root, resolution: int = 512, random_crop: bool = False, hflip: bool = False,
                 cfg_drop: float = 0.0, seed: int = 0, max_bad_fraction: float = 0.01,
                 split: str = "train", caption_column: str = "text", max_train_samples: int = 0,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        super().__init__(seed, cfg_drop, max_bad_fraction, resolution, random_crop, hflip,
                         max_image_pixels=max_image_pixels)
        self.root, entries = read_captions(root, split, caption_column)
        self.entries = entries[:max_train_samples] if max_train_samples > 0 else entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict | None:
        self._fetch(i)
        name, text = self.entries[i]
        path, rng = self.root / name, self._item_rng(i)
        prompt = self._prompt(text, rng)
        try:
            img = open_image(confined(self.root, name), self.max_image_pixels)
        except Refused as e:
            return self._skip(str(path), f"refused: {e}")
        except Exception as e:  # missing file or any of PIL's error types
            return self._skip(str(path), f"unreadable image ({type(e).__name__}: {e})")
        x, geometry = self._transform_with_geometry([img], rng)
        return {"prompt": prompt, "x0_w": x[0], **geometry}  # (3,R,R), (h, w), (top, left)


# ---------------------------------------------------------------------------------------------
# Batching and sampling

def collate(items: list[dict | None]) -> dict:
    """Stack items into a batch, dropping None (skipped) items.

    -> {"prompt": list[str], "x0_w": (B,...), ["x0_l": (B,...)], ["label": (B,) long],
        "num_skipped": int}. If every item was skipped: {"prompt": [], "num_skipped": n}.
    """
    kept = [it for it in items if it is not None]
    batch: dict = {"prompt": [], "num_skipped": len(items) - len(kept)}
    for key in (kept[0] if kept else {}):
        values = [it[key] for it in kept]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], str):
            batch[key] = values
        else:
            batch[key] = torch.tensor(values)  # ints -> (B,) int64; (h, w) pairs -> (B,2)
    return batch


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can resume mid-epoch.

    ``set_epoch(epoch, start)``: yield this rank's order for ``epoch`` (identical to
    DistributedSampler's) from position ``start`` on, i.e. skip the ``start`` items this rank
    already consumed (``batches_done * batch_size``) without loading them again. ``start``
    stays until the next set_epoch. Without an initialised process group it acts as one rank.
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        distributed = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None or distributed else 1
        rank = rank if rank is not None or distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start={start} outside [0, {self.num_samples}] "
                             f"(items per rank per epoch)")
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start
