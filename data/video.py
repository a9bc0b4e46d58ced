"""Captioned videos (MagicTime-style text-to-video data), decoded with PyAV; see data/__init__.py for the
item layout, determinism and the counting of unreadable items."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from data import MAX_IMAGE_PIXELS, BaseDataset, Refused, check_pixels, confined
from data.layouts import read_captions, read_jsonl


def _read_magictime_csv(path: Path) -> list[tuple[str, str]]:
    """MagicTime / ChronoMagic caption CSV: columns `videoid`, `name` (caption); the video is
    `{videoid}.mp4` next to the other videos."""
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} not found")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("videoid", "name") if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; expected MagicTime columns "
                                 f"'videoid' and 'name', found {reader.fieldnames}")
            entries = [(f"{r['videoid']}.mp4", r["name"]) for r in reader]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    if not entries:
        raise ValueError(f"{path}: no rows")
    return entries



class _ShortVideo(Exception):
    pass


def _decode_frames(path: Path, num_frames: int, total: int | None = None,
                   max_pixels: int = MAX_IMAGE_PIXELS) -> list[Image.Image]:
    """F frames spread uniformly over the whole clip (first and last included); a frame size over
    ``max_pixels`` (from the stream's header) is Refused before any frame is decoded."""
    import av  # PyAV loads with the first video read: importing the package needs no decoder
    if total is None:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels)
            # Container metadata may lack a frame count; counting packets avoids decoding.
            total = stream.frames or sum(1 for p in c.demux(stream) if p.size)
    if total < num_frames:
        raise _ShortVideo(f"has {total} frames, expected at least num_frames={num_frames}")
    want = np.linspace(0, total - 1, num_frames).round().astype(int)  # (F,)
    kept, decoded = {}, 0
    with av.open(str(path)) as c:
        for decoded, frame in enumerate(c.decode(video=0), 1):
            if decoded - 1 in want:
                kept[decoded - 1] = frame.to_image()
            if decoded - 1 >= want[-1]:
                break
    if decoded - 1 < want[-1]:  # the container overstated its length: retry with the real one
        return _decode_frames(path, num_frames, decoded, max_pixels)
    return [kept[k] for k in want]


class VideoFolderDataset(BaseDataset):
    """Captioned videos decoded with PyAV (MagicTime-style text-to-video data).

    Captions: a metadata file as for image folders (``data_layouts.read_captions``: metadata.jsonl
    or .csv in ``root`` or ``root/{split}``, ``caption_column``) by default, or a MagicTime CSV
    (``captions=path``, columns videoid,name; videos at ``root/{videoid}.mp4``).
    ``max_train_samples`` > 0 keeps the first N entries.
    ``num_frames`` frames are sampled uniformly over the whole clip ("dynamic frame extraction")
    and all get the same resize/crop/flip: the smallest resize that covers ``height`` x ``width``
    (0 = resolution, square), then a center (or random) crop to it. A clip with fewer frames is
    skipped and counted.

    item: {"prompt": str, "x0_w": (3,F,H,W)}, or None if the video is unreadable or too short.
    """

    def __init__(self, root, num_frames: int = 16, resolution: int = 256, random_crop: bool = False,
                 hflip: bool = False, cfg_drop: float = 0.0, seed: int = 0,
                 max_bad_fraction: float = 0.01, captions: str | Path | None = None,
                 split: str = "train", caption_column: str = "text", max_train_samples: int = 0,
                 height: int = 0, width: int = 0, max_image_pixels: int = MAX_IMAGE_PIXELS):
        super().__init__(seed, cfg_drop, max_bad_fraction, resolution, random_crop, hflip, height, width,
                         max_image_pixels)
        self.root = Path(root)
        if captions is None:
            self.root, self.entries = read_captions(self.root, split, caption_column)
        elif not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a directory")
        else:
            self.entries = _read_magictime_csv(Path(captions))
        if max_train_samples > 0:
            self.entries = self.entries[:max_train_samples]
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = num_frames

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict | None:
        self._fetch(i)
        name, text = self.entries[i]
        path, rng = self.root / name, self._item_rng(i)
        prompt = self._prompt(text, rng)
        try:
            frames = _decode_frames(confined(self.root, name), self.num_frames, max_pixels=self.max_image_pixels)
        except Refused as e:
            return self._skip(str(path), f"refused: {e}")
        except _ShortVideo as e:
            return self._skip(str(path), f"video too short: {e}")
        except Exception as e:  # PyAV/FFmpeg errors, missing file, no video stream
            return self._skip(str(path), f"unreadable video ({type(e).__name__}: {e})")
        video = self._transform(frames, rng)  # (F,3,H,W)
        return {"prompt": prompt, "x0_w": video.permute(1, 0, 2, 3).contiguous()}  # (3,F,H,W)


def _read_pairs(root: Path) -> list[tuple[str, str, str]]:
    """root/pairs.jsonl: one {"text": str, "winner": file, "loser": file} per line."""
    path = root / "pairs.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; expected one JSON object per line with "
                                f"'text', 'winner' and 'loser' (video files relative to {root})")
    entries = []
    for n, obj in read_jsonl(path):
        if not all(isinstance(obj.get(k), str) for k in ("text", "winner", "loser")):
            raise ValueError(f"{path}:{n}: expected {{\"text\": str, \"winner\": str, \"loser\": str}}, got {obj}")
        entries.append((obj["text"], obj["winner"], obj["loser"]))
    if not entries:
        raise ValueError(f"{path}: no entries")
    return entries


class VideoPairFolderDataset(VideoFolderDataset):
    """Video preference pairs (Diffusion-DPO / DPO-C&M / SDPO on video): ``root/pairs.jsonl`` with
    {"text", "winner", "loser"}; both clips are decoded as :class:`VideoFolderDataset` decodes one
    and get the same resize/crop/flip (to height x width). mode "winners" (SFT, SSPO) returns the
    winner only.

    item: {"prompt": str, "x0_w": (3,F,H,W), "x0_l": (3,F,H,W)} (no x0_l in mode "winners"), or
    None (skipped and counted) if either clip is unreadable or too short.
    """

    def __init__(self, root, mode: str = "pairs", num_frames: int = 16, resolution: int = 256,
                 random_crop: bool = False, hflip: bool = False, cfg_drop: float = 0.0, seed: int = 0,
                 max_bad_fraction: float = 0.01, height: int = 0, width: int = 0,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        BaseDataset.__init__(self, seed, cfg_drop, max_bad_fraction, resolution, random_crop, hflip, height, width,
                             max_image_pixels)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.root, self.mode, self.num_frames = Path(root), mode, num_frames
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a directory")
        self.pairs = _read_pairs(self.root)
        self.entries = [(w, text) for text, w, _ in self.pairs]

    def __getitem__(self, i: int) -> dict | None:
        self.num_seen += 1
        text, win, lose = self.pairs[i]
        rng = self._item_rng(i)
        prompt = self._prompt(text, rng)
        state = rng.bit_generator.state  # the same crop/flip for both clips
        out = {"prompt": prompt}
        for key, name in (("x0_w", win), ("x0_l", lose))[:1 if self.mode == "winners" else 2]:
            path = self.root / name
            try:
                frames = _decode_frames(confined(self.root, name), self.num_frames, max_pixels=self.max_image_pixels)
            except Refused as e:
                return self._skip(str(path), f"refused: {e}")
            except _ShortVideo as e:
                return self._skip(str(path), f"video too short: {e}")
            except Exception as e:
                return self._skip(str(path), f"unreadable video ({type(e).__name__}: {e})")
            rng.bit_generator.state = state
            out[key] = self._transform(frames, rng).permute(1, 0, 2, 3).contiguous()  # (3,F,H,W)
        return out
