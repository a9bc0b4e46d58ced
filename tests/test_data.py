"""Tests for data/__init__.py: CPU only, no downloads; every file is written by the test itself."""
import io
import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, DistributedSampler

import data
import data.video
import digits

ROOT = Path(__file__).resolve().parents[1]


def _png(value: int, size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def _word_digit(prompt: str) -> int:
    """The digit named in a caption, parsed independently of data/__init__.py's bookkeeping."""
    found = [d for d, w in enumerate(digits.DIGIT_WORDS) if w in prompt.split() or w + "," in prompt.split()]
    assert len(found) == 1, prompt
    return found[0]


# ------------------------------------------------------------------------------ Pick-a-Pic

BRIGHT, DARK = 230, 20  # every winner image is bright, every loser dark


def _pickapic_rows(labels, corrupt_row=None):
    rows = []
    for k, label in enumerate(labels):
        win0 = label != 0.0  # for a tie either is fine
        jpg_0, jpg_1 = (_png(BRIGHT), _png(DARK)) if win0 else (_png(DARK), _png(BRIGHT))
        if k == corrupt_row:
            jpg_0 = b"\xff\xd8 definitely not a jpeg"
        rows.append({"are_different": True, "best_image_uid": f"uid{k}", "caption": f"caption {k}",
                     "has_label": True, "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label,
                     "label_1": 1.0 - label, "model_0": "sd", "model_1": "sdxl"})
    return rows


def _write_shard(path, rows, drop=()):
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("are_different", pa.bool_()), ("best_image_uid", pa.string()), ("caption", pa.string()),
        ("has_label", pa.bool_()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
        ("label_0", pa.float64()), ("label_1", pa.float64()), ("model_0", pa.string()),
        ("model_1", pa.string())]))
    for name in drop:
        table = table.drop_columns([name])
    pq.write_table(table, path, row_group_size=2)  # several row groups per shard


@pytest.fixture
def pickapic(tmp_path):
    """Two shards, 7 rows: one tie (shard 0 row 2) and one corrupt winner image (shard 0 row 3)."""
    _write_shard(tmp_path / "train-00000-of-00002.parquet",
                 _pickapic_rows([1.0, 0.0, 0.5, 1.0], corrupt_row=3))
    _write_shard(tmp_path / "train-00001-of-00002.parquet", _pickapic_rows([0.0, 1.0, 0.0]))
    (tmp_path / "validation-00000-of-00001.parquet").write_bytes(b"ignored: other split")
    return tmp_path


def test_pickapic_pairs_drop_tie_and_put_winner_first(pickapic, caplog):
    ds = data.PickAPicDataset(pickapic, mode="pairs", resolution=8, max_bad_fraction=0.5)
    assert len(ds) == 6 and ds.num_ties == 1 and ds.num_unlabeled == 0
    with caplog.at_level(logging.WARNING, logger="data"):
        items = [ds[i] for i in range(len(ds))]
    assert [it is None for it in items] == [False, False, True, False, False, False]
    assert ds.num_skipped == 1
    assert "train-00000-of-00002.parquet row 3 column jpg_0" in caplog.text
    batch = data.collate(items)
    assert batch["num_skipped"] == 1
    assert batch["prompt"] == ["caption 0", "caption 1", "caption 0", "caption 1", "caption 2"]
    assert batch["x0_w"].shape == batch["x0_l"].shape == (5, 3, 8, 8)
    # Winners are bright whichever column they came from (label_0 = 0 rows included).
    assert torch.allclose(batch["x0_w"], torch.full_like(batch["x0_w"], BRIGHT / 127.5 - 1))
    assert torch.allclose(batch["x0_l"], torch.full_like(batch["x0_l"], DARK / 127.5 - 1))


def test_pickapic_winners_and_random_modes(pickapic):
    winners = data.PickAPicDataset(pickapic, mode="winners", resolution=8, max_bad_fraction=0.5)
    batch = data.collate([winners[i] for i in range(len(winners))])
    assert set(batch) == {"prompt", "x0_w", "num_skipped", "original_size", "crop_top_left"} and batch["x0_w"].shape == (5, 3, 8, 8)
    assert (batch["x0_w"] > 0.5).all()

    def brightness(seed):
        ds = data.PickAPicDataset(pickapic, mode="random", resolution=8, seed=seed, max_bad_fraction=0.5)
        out = [None if it is None else it["x0_w"].mean().item() > 0 for it in (ds[i] for i in range(len(ds)))]
        return out, ds.coin

    picks, coin = brightness(0)
    # The image is the (bright) winner exactly when the item's seeded coin says so; the
    # corrupt row 3 is None only if its coin picked the corrupt winner image.
    for pick, c in zip(picks, coin):
        assert pick is None or pick == bool(c)
    assert brightness(0)[0] == picks  # deterministic for a seed
    assert any(brightness(s)[0] != picks for s in range(1, 6))  # and the seed matters
    coins = np.concatenate([brightness(s)[1] for s in range(8)])
    assert 0.2 < coins.mean() < 0.8  # both images of a pair get chosen


def test_pickapic_reads_images_lazily_by_row_group(pickapic, monkeypatch):
    calls = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, g, columns=None, **kw: calls.append(columns) or real(self, g, columns=columns, **kw))
    ds = data.PickAPicDataset(pickapic, mode="winners", resolution=8, max_bad_fraction=0.5)
    assert calls == []  # the index touched no image bytes
    ds[0], ds[1]  # same row group: read once
    assert calls == [["jpg_0", "jpg_1"]]


def test_pickapic_errors(pickapic, tmp_path_factory):
    with pytest.raises(ValueError, match="unknown mode 'loser'"):
        data.PickAPicDataset(pickapic, mode="loser")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match=r"no Pick-a-Pic split 'train' found; looked for ROOT/data/train-\*.parquet"):
        data.PickAPicDataset(empty)
    bad = tmp_path_factory.mktemp("bad")
    _write_shard(bad / "train-0.parquet", _pickapic_rows([1.0]), drop=["jpg_1"])
    with pytest.raises(ValueError, match=r"train-0.parquet: missing column\(s\) \['jpg_1'\]"):
        data.PickAPicDataset(bad)
    (bad / "train-0.parquet").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="train-0.parquet: not a readable parquet file"):
        data.PickAPicDataset(bad)
    strict = data.PickAPicDataset(pickapic, mode="winners", resolution=8, max_bad_fraction=0.0)
    strict[0]
    with pytest.raises(RuntimeError, match=r"too many unreadable items: 1 of 3.*row 3"):
        strict[1], strict[2]


# ------------------------------------------------------------------------------ image folder

def _image_folder(root, entries):
    root.mkdir(exist_ok=True)
    with open(root / "metadata.jsonl", "w") as fh:
        for name, text in entries:
            fh.write(json.dumps({"file_name": name, "text": text}) + "\n")


def test_image_folder_shapes_range_and_center_crop(tmp_path):
    # 24x16 image: black 4-px borders left/right, white middle 16 px -> the centre crop is all white.
    arr = np.zeros((16, 24, 3), np.uint8)
    arr[:, 4:20] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.new("RGB", (40, 30), (10, 200, 90)).save(tmp_path / "b.jpg")
    (tmp_path / "broken.png").write_bytes(b"nope")
    _image_folder(tmp_path, [("a.png", "white"), ("b.jpg", "green"), ("broken.png", "x")])
    ds = data.ImageFolderDataset(tmp_path, resolution=16)
    a, b = ds[0], ds[1]
    assert a["prompt"] == "white" and a["x0_w"].shape == (3, 16, 16) and a["x0_w"].dtype == torch.float32
    assert torch.equal(a["x0_w"], torch.ones(3, 16, 16))
    assert b["x0_w"].shape == (3, 16, 16)
    assert torch.allclose(b["x0_w"][:, 8, 8], torch.tensor([10, 200, 90]) / 127.5 - 1, atol=0.02)
    assert ds[2] is None and ds.num_skipped == 1


def test_random_crop_and_flip_are_seeded_per_epoch(tmp_path):
    arr = np.zeros((16, 24, 3), np.uint8)
    arr[:, 4:20] = 255
    arr[:, 4] = 128  # makes a flip visible
    Image.fromarray(arr).save(tmp_path / "a.png")
    _image_folder(tmp_path, [("a.png", "t")] * 8)
    ds = data.ImageFolderDataset(tmp_path, resolution=16, random_crop=True, hflip=True, seed=3)
    first = [ds[i]["x0_w"] for i in range(8)]
    assert all(torch.equal(x, ds[i]["x0_w"]) for i, x in enumerate(first))  # same seed+epoch+index
    assert any(not torch.equal(first[0], x) for x in first[1:])  # items differ
    assert any((x < 1).any() for x in first)  # some crops include the black border
    ds.set_epoch(1)
    assert any(not torch.equal(x, ds[i]["x0_w"]) for i, x in enumerate(first))  # new epoch, new crops


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no captions found; looked for ROOT/metadata.jsonl"):
        data.ImageFolderDataset(tmp_path, resolution=8)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file": "b.png"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: expected"):
        data.ImageFolderDataset(tmp_path, resolution=8)
    (tmp_path / "metadata.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no entries"):
        data.ImageFolderDataset(tmp_path, resolution=8)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.ImageFolderDataset(tmp_path / "nowhere", resolution=8)


def test_cfg_drop_rate_and_determinism():
    ds = digits.DigitsDataset("pretrain", cfg_drop=0.25, seed=1)
    empty = np.array([ds[i]["prompt"] == "" for i in range(len(ds))])
    assert 0.18 < empty.mean() < 0.32
    assert all((ds[i]["prompt"] == "") == e for i, e in enumerate(empty))
    ds.set_epoch(1)
    assert (np.array([ds[i]["prompt"] == "" for i in range(len(ds))]) != empty).any()
    assert all(digits.DigitsDataset("pretrain")[i]["prompt"] for i in range(50))  # default: never


# ------------------------------------------------------------------------------ video folder

def _write_video(path, num_frames, size=(32, 24)):
    """Gray frames whose brightness is 20 * frame index, so the sampled frames can be identified."""
    with av.open(str(path), "w") as c:
        stream = c.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"qscale": "1"}
        for k in range(num_frames):
            img = np.full((size[1], size[0], 3), 20 * k, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


def test_video_folder_samples_frames_uniformly(tmp_path, caplog):
    _write_video(tmp_path / "clip.mp4", 12)
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    _image_folder(tmp_path, [("clip.mp4", "a clip"), ("junk.mp4", "junk")])
    ds = data.video.VideoFolderDataset(tmp_path, num_frames=4, resolution=16, max_bad_fraction=0.5)
    item = ds[0]
    x = item["x0_w"]
    assert item["prompt"] == "a clip" and x.shape == (3, 4, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # Frames 0, 4, 7, 11 of 12 (first and last included), brightness 20 * index.
    expected = torch.tensor([0, 80, 140, 220]) / 127.5 - 1
    assert torch.allclose(x.mean(dim=(0, 2, 3)), expected, atol=0.06)
    assert ds[1] is None and "junk.mp4" in caplog.text and "unreadable video" in caplog.text

    short = data.video.VideoFolderDataset(tmp_path, num_frames=16, resolution=16, max_bad_fraction=0.5)
    assert short[0] is None and short.num_skipped == 1
    assert "clip.mp4: video too short: has 12 frames, expected at least num_frames=16" in caplog.text


def test_video_folder_magictime_csv(tmp_path):
    # (the crop shared by frames is test_video_crop_is_shared_by_frames's: uniform gray frames
    # here could not show it)
    _write_video(tmp_path / "v1.mp4", 6, size=(48, 16))
    (tmp_path / "captions.csv").write_text('videoid,name,is_transmit\nv1,"a flower, blooming",0\n')
    ds = data.video.VideoFolderDataset(tmp_path, num_frames=6, resolution=16, captions=tmp_path / "captions.csv")
    item = ds[0]
    assert item["prompt"] == "a flower, blooming" and item["x0_w"].shape == (3, 6, 16, 16)
    (tmp_path / "bad.csv").write_text("id,caption\nv1,x\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) \['videoid', 'name'\]"):
        data.video.VideoFolderDataset(tmp_path, captions=tmp_path / "bad.csv")


def test_video_crop_is_shared_by_frames(tmp_path):
    # A bright vertical bar at a fixed place in every frame: it must land at the same columns
    # in every output frame whatever the random crop is.
    path = tmp_path / "bar.mp4"
    with av.open(str(path), "w") as c:
        stream = c.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 16, "yuv420p"
        stream.options = {"qscale": "1"}
        for _ in range(5):
            img = np.zeros((16, 64, 3), np.uint8)
            img[:, 30:34] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    _image_folder(tmp_path, [("bar.mp4", "bar")] * 4)
    ds = data.video.VideoFolderDataset(tmp_path, num_frames=5, resolution=16, random_crop=True, seed=0)
    for i in range(4):
        cols = ds[i]["x0_w"].mean(dim=(0, 2))  # (F, W) column profile per frame
        assert torch.allclose(cols, cols[:1].expand_as(cols), atol=0.1)


# ------------------------------------------------------------------------------ digits

def test_digits_splits_disjoint_cover_and_match_sklearn():
    idx = digits.digits_split_indices()
    sizes = {k: len(v) for k, v in idx.items()}
    assert sum(sizes.values()) == 1797 and abs(sizes["pretrain"] - 898) <= 10
    assert np.array_equal(np.sort(np.concatenate(list(idx.values()))), np.arange(1797))  # disjoint + cover
    sk = load_digits()
    splits = digits.load_digits_splits()
    for name, (x, y) in splits.items():
        assert x.shape == (len(idx[name]), 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(y, torch.from_numpy(sk.target[idx[name]]))
        assert torch.allclose(x.reshape(-1, 64), torch.from_numpy(sk.data[idx[name]] / 8 - 1).float())
        counts = np.bincount(y.numpy(), minlength=10) / len(y)  # stratified: same class mix
        assert np.allclose(counts, np.bincount(sk.target) / 1797, atol=0.01)
    assert not np.array_equal(digits.digits_split_indices(1)["eval"], idx["eval"])


def test_digits_splits_stable_across_processes():
    code = "import digits, json; print(json.dumps({k: v.tolist() for k, v in digits.digits_split_indices().items()}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    idx = digits.digits_split_indices()
    assert json.loads(out.stdout) == {k: v.tolist() for k, v in idx.items()}
    # Pinned: if this changes, eval digits could leak into training of an older checkpoint.
    assert idx["eval"][:5].tolist() == [8, 11, 15, 20, 21] and len(idx["eval"]) == 449


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 1.0])
def test_digits_corrupt_fraction_is_exact_and_fixed(fraction):
    ds = digits.DigitsDataset("pretrain", corrupt_fraction=fraction, seed=7)
    named = np.array([_word_digit(ds[i]["prompt"]) for i in range(len(ds))])
    labels = np.array([ds[i]["label"] for i in range(len(ds))])
    assert (named != labels).sum() == round(fraction * len(ds))
    ds.set_epoch(5)  # fixed per item, not per epoch
    assert all(_word_digit(ds[i]["prompt"]) == named[i] for i in range(0, len(ds), 37))
    assert all(any(ds[i]["prompt"] == digits.digit_caption(named[i], t) for t in digits.TRAIN_TEMPLATES)
               for i in range(20))


def test_digits_pairs_mix_wrong_digits_and_worse_right_digits():
    """Losers as Pick-a-Pic's: a share show another digit (identified by their pixels among the
    real digits, independently of ds.loser_index), the rest the prompted digit, degraded (not a
    real image, but closest to a real image of the prompted digit)."""
    for split, classes, mix in [("align", None, 0.5), ("align", [3], 1.0), ("pretrain", [0, 1, 2], 0.3)]:
        ds = digits.DigitsDataset(split, mode="pairs", classes=classes, corrupt_fraction=0.2,
                                  loser_wrong_fraction=mix)
        real_x, real_y = digits.load_digits_splits()[split]
        digits_of = {}
        for x, y in zip(real_x, real_y):
            digits_of.setdefault(x.numpy().tobytes(), set()).add(int(y))
        wrong = 0
        for i in range(len(ds)):
            item = ds[i]
            asked = _word_digit(item["prompt"]) if item["prompt"] else int(ds.caption_labels[i])
            shown = digits_of.get(item["x0_l"].numpy().tobytes())
            if shown is not None:  # a real image: a wrong digit, never the image's or the caption's
                assert item["label"] not in shown and asked not in shown
                wrong += 1
            else:  # degraded: nearest real digit of the split shows the caption's digit
                d = ((real_x - item["x0_l"]) ** 2).flatten(1).sum(1)
                assert int(real_y[d.argmin()]) == int(ds.caption_labels[i])
                assert not torch.equal(item["x0_l"], item["x0_w"])
            assert classes is None or item["label"] in classes
        assert abs(wrong / len(ds) - mix) < 0.1, (split, wrong / len(ds), mix)
    rand = digits.DigitsDataset("align", mode="random", loser_wrong_fraction=0.5)
    assert 0.15 < rand.wrong_target_fraction() < 0.35  # about half the coins x half the losers
    assert digits.DigitsDataset("align", mode="random", loser_wrong_fraction=0.0).wrong_target_fraction() == 0


def test_digits_random_mode_and_modes_shapes():
    pairs = digits.DigitsDataset("align", mode="pairs", seed=2)
    rand = digits.DigitsDataset("align", mode="random", seed=2)
    win = digits.DigitsDataset("align", mode="winners", seed=2)
    took_winner = []
    for i in range(len(rand)):
        p, r, w = pairs[i], rand[i], win[i]
        assert set(w) == {"prompt", "x0_w", "label"} and w["x0_w"].shape == (1, 8, 8)
        assert r["prompt"] == p["prompt"] == w["prompt"]
        is_w, is_l = torch.equal(r["x0_w"], p["x0_w"]), torch.equal(r["x0_w"], p["x0_l"])
        assert is_w != is_l
        took_winner.append(is_w)
    assert 0.4 < np.mean(took_winner) < 0.6
    batch = data.collate([pairs[i] for i in range(5)])
    assert batch["x0_l"].shape == (5, 1, 8, 8) and batch["label"].dtype == torch.int64


def test_digits_heldout_templates_and_errors():
    assert not set(digits.TRAIN_TEMPLATES) & set(digits.HELDOUT_TEMPLATES)
    ds = digits.DigitsDataset("eval", templates=digits.HELDOUT_TEMPLATES)
    assert all(any(ds[i]["prompt"] == digits.digit_caption(ds[i]["label"], t) for t in digits.HELDOUT_TEMPLATES)
               for i in range(20))
    assert digits.digit_caption(7, "a handwritten digit {word}") == "a handwritten digit seven"
    with pytest.raises(ValueError, match="unknown digits split 'test'"):
        digits.DigitsDataset("test")
    with pytest.raises(ValueError, match="unknown mode 'pair'"):
        digits.DigitsDataset("align", mode="pair")
    with pytest.raises(ValueError, match="classes must be"):
        digits.DigitsDataset("align", classes=[12])
    with pytest.raises(ValueError, match="corrupt_fraction"):
        digits.DigitsDataset("align", corrupt_fraction=1.5)


# ------------------------------------------------------------------------------ collate, sampler

def test_collate_drops_none_and_counts():
    items = [{"prompt": "a", "x0_w": torch.zeros(1, 8, 8), "label": 3}, None,
             {"prompt": "b", "x0_w": torch.ones(1, 8, 8), "label": 5}]
    batch = data.collate(items)
    assert batch["prompt"] == ["a", "b"] and batch["num_skipped"] == 1
    assert batch["x0_w"].shape == (2, 1, 8, 8) and batch["label"].tolist() == [3, 5]
    assert batch["label"].dtype == torch.int64
    assert data.collate([None, None]) == {"prompt": [], "num_skipped": 2}


@pytest.mark.parametrize("n,world,drop_last", [(20, 2, False), (23, 3, True), (7, 4, False)])
def test_sampler_ranks_disjoint_cover_and_match_torch(n, world, drop_last):
    ds = list(range(n))
    shards = []
    for rank in range(world):
        ours = data.ResumableDistributedSampler(ds, num_replicas=world, rank=rank, seed=5, drop_last=drop_last)
        ref = DistributedSampler(ds, num_replicas=world, rank=rank, seed=5, drop_last=drop_last)
        ours.set_epoch(2)
        ref.set_epoch(2)
        assert list(ours) == list(ref) and len(ours) == len(ref)
        shards.append(list(ours))
    flat = [i for s in shards for i in s]
    if n % world == 0 or drop_last:  # no padding: each item at most once
        assert len(flat) == len(set(flat))
    if not drop_last:  # every item seen (padding repeats a few)
        assert set(flat) == set(ds)
        assert len(flat) - len(set(flat)) == (-n) % world
    else:
        assert len(flat) == n - n % world


def test_sampler_resume_gives_the_remaining_sequence():
    ds = digits.DigitsDataset("align")
    sampler = data.ResumableDistributedSampler(ds, num_replicas=2, rank=1, seed=0)
    sampler.set_epoch(3)
    full = list(sampler)
    assert len(set(full)) == len(full) == 225
    for start in (0, 1, 100, 225):
        sampler.set_epoch(3, start=start)
        assert list(sampler) == full[start:] and len(sampler) == 225 - start
    sampler.set_epoch(4)
    assert list(sampler) != full
    with pytest.raises(ValueError, match="start=226 outside"):
        sampler.set_epoch(3, start=226)

    # Through a DataLoader: stop after 3 batches, resume in a fresh sampler/loader.
    def loader(start):
        s = data.ResumableDistributedSampler(ds, num_replicas=2, rank=1, seed=0)
        s.set_epoch(3, start=start)
        ds.set_epoch(3)
        return DataLoader(ds, batch_size=8, sampler=s, collate_fn=data.collate)

    uninterrupted = [b["prompt"] for b in loader(0)]
    resumed = [b["prompt"] for b in loader(3 * 8)]
    assert resumed == uninterrupted[3:]


def test_sampler_without_process_group_is_single_rank():
    s = data.ResumableDistributedSampler(list(range(10)), shuffle=False)
    assert list(s) == list(range(10))


def test_pickapic_through_dataloader_with_workers(pickapic):
    ds = data.PickAPicDataset(pickapic, mode="pairs", resolution=8, max_bad_fraction=0.5)
    sampler = data.ResumableDistributedSampler(ds, num_replicas=1, rank=0, shuffle=False)
    batches = list(DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=data.collate, num_workers=2))
    assert [len(b["prompt"]) for b in batches] == [3, 2] and sum(b["num_skipped"] for b in batches) == 1
    ds[0]  # fills the row-group cache; a pickled copy (spawned worker) starts without it
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._cache is None and all(f._handle is None for f in copy.files) and torch.equal(copy[0]["x0_w"], ds[0]["x0_w"])


def test_digits_base_reads_first_then_learns_a_misaligned_conditional(tmp_path, monkeypatch):
    """build_base: stage 1 on clean captions trains the text encoder with the UNet; stage 2 uses
    `corrupt` wrong captions with the text encoder frozen (as SD-1.5's); the result loads."""
    import models
    seen = []
    real = digits.DigitsDataset

    class Spy(real):
        def __init__(self, split, *a, corrupt_fraction=0.0, **k):
            seen.append((split, corrupt_fraction))
            super().__init__(split, *a, corrupt_fraction=corrupt_fraction, **k)

    monkeypatch.setattr(digits, "DigitsDataset", Spy)
    fresh = models.build_model("digits", None).text_encoder.state_dict()
    out = digits.build_base(tmp_path / "base", steps=4, corrupt=0.65, batch_size=4, warmup=1)
    assert seen == [("pretrain", 0.0), ("pretrain", 0.65)]
    built = models.build_model("digits", str(out))
    te = built.text_encoder.state_dict()
    assert any(not torch.equal(te[k], fresh[k]) for k in fresh)  # the text pathway learned
    assert not any(p.requires_grad for p in built.text_encoder.parameters())
    frozen = digits.build_base(tmp_path / "no_reading", steps=2, corrupt=0.65, batch_size=4, warmup=1,
                               read_fraction=0.0)  # stage 2 alone: the text encoder must not move
    te2 = models.build_model("digits", str(frozen)).text_encoder.state_dict()
    assert all(torch.equal(te2[k], fresh[k]) for k in fresh)


def test_digits_pair_noise_swaps_keyed_items_for_every_mode():
    """pair_noise = 0.2: exactly round(0.2 N) items, a function of (seed, index), come with winner
    and loser swapped, in pairs mode and in winners mode (SFT/SSPO see the swapped winner);
    the other items are untouched; another seed swaps other items."""
    clean = digits.DigitsDataset("align", mode="pairs", seed=0)
    noisy = digits.DigitsDataset("align", mode="pairs", seed=0, pair_noise=0.2)
    n = len(clean)
    assert noisy.swapped.sum() == round(0.2 * n)
    again = digits.DigitsDataset("align", mode="winners", seed=0, pair_noise=0.2)
    assert (again.swapped == noisy.swapped).all()  # any process, any resume: same seed, same items
    other = digits.DigitsDataset("align", mode="pairs", seed=1, pair_noise=0.2)
    assert (other.swapped != noisy.swapped).any()
    for i in list(range(n))[::-1]:  # read in any order
        a, b, w = clean[i], noisy[i], again[i]
        if noisy.swapped[i]:
            assert torch.equal(b["x0_w"], a["x0_l"]) and torch.equal(b["x0_l"], a["x0_w"])
            assert torch.equal(w["x0_w"], a["x0_l"]) and w["label"] == int(clean.loser_y[i])
        else:
            assert torch.equal(b["x0_w"], a["x0_w"]) and torch.equal(b["x0_l"], a["x0_l"])
        assert b["prompt"] == a["prompt"]
    with pytest.raises(ValueError, match="pair_noise"):
        digits.DigitsDataset("align", pair_noise=1.5)
