"""From settings to the things a run trains: the data set (with each item's index, which keys
its noise) and the model bundle (``--model_path``, or the cached digits base)."""
from __future__ import annotations

import torch

import data
import data.video
import digits
import models
from config import METHODS, Config


def build_dataset(cfg: Config):
    mode = METHODS[cfg.method].data_mode
    common = dict(mode=mode, cfg_drop=cfg.cfg_drop, seed=cfg.seed)
    if cfg.data == "digits":
        classes = [int(c) for c in cfg.digits_classes.split(",") if c.strip()] or None  # validated
        corrupt = cfg.digits_corrupt if cfg.data_split == "pretrain" else 0.0
        align = cfg.data_split == "align"
        return digits.DigitsDataset(cfg.data_split, corrupt_fraction=corrupt, classes=classes if align else None,
                                    per_class=(cfg.digits_align_per_class or None) if align else None,
                                    loser_wrong_fraction=cfg.digits_loser_wrong,
                                    pair_noise=cfg.pair_noise if align else 0.0, **common)
    aug = dict(resolution=cfg.resolution, random_crop=cfg.random_crop, hflip=cfg.hflip,
               cfg_drop=cfg.cfg_drop, seed=cfg.seed, max_image_pixels=cfg.max_image_pixels)
    subset = dict(split=cfg.dataset_split_name, max_train_samples=cfg.max_train_samples)
    folder = dict(subset, caption_column=cfg.caption_column)
    if cfg.data == "pickapic":
        return data.PickAPicDataset(cfg.data_path, mode=mode, **aug, **subset)
    frame = dict(num_frames=cfg.num_frames, height=cfg.height, width=cfg.width)  # video: (H, W) may differ
    if cfg.data == "videopairs":
        return data.video.VideoPairFolderDataset(cfg.data_path, mode=mode, **frame, **aug)
    if mode == "pairs":
        raise ValueError(f"method {cfg.method!r} needs preference pairs; data {cfg.data!r} has none")
    if cfg.data == "imagefolder":
        return data.ImageFolderDataset(cfg.data_path, **aug, **folder)
    return data.video.VideoFolderDataset(cfg.data_path, **frame, **aug, **folder,
                                         captions=cfg.magictime_csv or None)


class Indexed(torch.utils.data.Dataset):
    """Adds each item's dataset index, which keys its noise (so DDP == one process)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def set_epoch(self, epoch):
        self.ds.set_epoch(epoch)

    def __getitem__(self, i):
        item = self.ds[i]
        return None if item is None else {**item, "index": i}


def model_path(cfg: Config) -> str | None:
    """Where the policy starts: --model_path, else the cached digits base (train.py builds it)."""
    if cfg.model_path:
        return cfg.model_path
    if cfg.model == "digits":
        return None if cfg.init == "scratch" else str(digits.base_dir(cfg.cache_dir, cfg.digits_base_steps,
                                                                      cfg.digits_corrupt))
    return None  # sd15/animatediff: the hub id's cache entry


def build_bundle(cfg: Config) -> models.Bundle:
    return models.build_model(cfg.model, model_path(cfg), lora_rank=cfg.lora_rank,
                              gradient_checkpointing=cfg.gradient_checkpointing,
                              local_files_only=cfg.local_files_only, num_frames=cfg.num_frames,
                              motion_adapter_path=cfg.motion_adapter_path or None)
