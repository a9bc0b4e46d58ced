"""The on-disk layouts data/layouts.py accepts: every layout, written here in tmp_path (the
``save_to_disk`` ones by the ``datasets`` library itself), must yield the same items as the plain
parquet folder; splits, max_train_samples, caption columns and the MagicTime CSV via config."""
import csv
import io
import json
import warnings

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import config
import data
import data.video
from infra import builders

# ------------------------------------------------------------------------------ Pick-a-Pic


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (value, 255 - value, value // 2)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(labels, prefix):
    """Row k: caption '{prefix} k', images of brightness 10k (jpg_0) and 10k+5 (jpg_1)."""
    return [{"caption": f"{prefix} {k}", "jpg_0": _png(10 * k), "jpg_1": _png(10 * k + 5),
             "label_0": label, "label_1": 1.0 - label, "best_image_uid": f"u{k}"}
            for k, label in enumerate(labels)]


TRAIN = [1.0, 0.5, 0.0, 1.0, 0.0, 0.5, 1.0]  # two ties
VALID = [0.0, 1.0]


def _write_parquet_folder(folder):
    folder.mkdir(parents=True)
    rows = _rows(TRAIN, "train")
    pq.write_table(pa.Table.from_pylist(rows[:4]), folder / "train-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist(rows[4:]), folder / "train-00001-of-00002.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist(_rows(VALID, "valid")), folder / "validation-00000-of-00001.parquet")


def _items(ds):
    return [ds[i] for i in range(len(ds))]


def _assert_same(items, reference):
    assert len(items) == len(reference)
    for a, b in zip(items, reference):
        assert a["prompt"] == b["prompt"]
        assert torch.equal(a["x0_w"], b["x0_w"]) and torch.equal(a["x0_l"], b["x0_l"])


@pytest.fixture
def layouts(tmp_path):
    """{name: root} of each Pick-a-Pic layout holding the same train (and validation) rows."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    roots = {"data_folder": tmp_path / "plain" / "data", "snapshot": tmp_path / "snapshot"}
    _write_parquet_folder(roots["data_folder"])
    _write_parquet_folder(roots["snapshot"] / "data")  # as huggingface-cli download writes it
    (roots["snapshot"] / "README.md").write_text("---\nlicense: mit\n---\n")
    train = datasets.Dataset.from_list(_rows(TRAIN, "train"), split="train")
    roots["saved_dataset"] = tmp_path / "saved_dataset"
    train.save_to_disk(str(roots["saved_dataset"]), num_shards=2)  # two data-*.arrow files
    image_struct = train.cast_column("jpg_0", datasets.Image())  # jpg_0 as {"bytes", "path"}
    roots["saved_dict"] = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": image_struct, "validation": datasets.Dataset.from_list(_rows(VALID, "valid"))}
                         ).save_to_disk(str(roots["saved_dict"]))
    return roots


def test_every_pickapic_layout_yields_the_plain_folders_items(layouts):
    reference = _items(data.PickAPicDataset(layouts["data_folder"], mode="pairs", resolution=8))
    # Independent of data/__init__.py: the winner of train row k (label_0 = 1 -> jpg_0) is brightness 10k.
    kept = [k for k, label in enumerate(TRAIN) if label != 0.5]
    assert [it["prompt"] for it in reference] == [f"train {k}" for k in kept]
    winners = [_png(10 * k if TRAIN[k] == 1.0 else 10 * k + 5) for k in kept]
    for item, png in zip(reference, winners):
        expected = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)), np.float32)).permute(2, 0, 1)
        assert torch.allclose(item["x0_w"].mean((1, 2)), expected.mean((1, 2)) / 127.5 - 1, atol=1e-5)
    for name in ("snapshot", "saved_dataset", "saved_dict"):
        ds = data.PickAPicDataset(layouts[name], mode="pairs", resolution=8)
        assert ds.num_ties == 2, name
        _assert_same(_items(ds), reference)
    assert len(data.PickAPicDataset(layouts["saved_dataset"], resolution=8).files) == 2


def test_pickapic_split_name_picks_the_split(layouts):
    for name in ("data_folder", "snapshot", "saved_dict"):
        ds = data.PickAPicDataset(layouts[name], mode="winners", resolution=8, split="validation")
        assert [it["prompt"] for it in _items(ds)] == ["valid 0", "valid 1"], name
    with pytest.raises(FileNotFoundError, match=r"splits \['train', 'validation'\], not 'test'"):
        data.PickAPicDataset(layouts["saved_dict"], split="test")
    with pytest.raises(ValueError, match="saved Dataset is split 'train', not the requested 'validation'"):
        data.PickAPicDataset(layouts["saved_dataset"], split="validation")


def test_max_train_samples_keeps_the_first_pairs_after_ties(layouts):
    full = _items(data.PickAPicDataset(layouts["snapshot"], mode="pairs", resolution=8))
    for name in ("snapshot", "saved_dataset"):
        ds = data.PickAPicDataset(layouts[name], mode="pairs", resolution=8, max_train_samples=3)
        assert len(ds) == 3 and len(ds.coin) == 3
        assert [it["prompt"] for it in _items(ds)] == ["train 0", "train 2", "train 3"]  # row 1 a tie
        _assert_same(_items(ds), full[:3])


def test_a_directory_of_no_layout_lists_every_layout(tmp_path):
    (tmp_path / "train.csv").write_text("caption\n")
    with pytest.raises(FileNotFoundError) as err:
        data.PickAPicDataset(tmp_path, split="train")
    message = str(err.value)
    assert "\n" not in message
    for looked in ("ROOT/data/train-*.parquet", "ROOT/train-*.parquet", "ROOT/dataset_dict.json",
                   "ROOT/state.json"):
        assert looked in message


# ------------------------------------------------------------------------------ image folders


def _images(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.new("RGB", (12, 10), (40 * k, 0, 0)).save(folder / f"{k}.png")
    return [(f"{k}.png", f"red {k}") for k in range(n)]


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def test_image_folder_csv_caption_fallback_and_train_subfolder(tmp_path):
    entries = _images(tmp_path / "jsonl")
    (tmp_path / "jsonl" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in entries))
    reference = _items(data.ImageFolderDataset(tmp_path / "jsonl", resolution=8))

    _images(tmp_path / "split" / "train")  # datasets' imagefolder layout: ROOT/train/metadata.csv
    _write_csv(tmp_path / "split" / "train" / "metadata.csv", ["file_name", "caption"], entries)
    _images(tmp_path / "split" / "test", 1)
    _write_csv(tmp_path / "split" / "test" / "metadata.csv", ["file_name", "caption"], [("0.png", "held out")])
    for kwargs in ({}, {"caption_column": "caption"}):
        got = _items(data.ImageFolderDataset(tmp_path / "split", resolution=8, **kwargs))
        assert [g["prompt"] for g in got] == [r["prompt"] for r in reference]
        assert all(torch.equal(g["x0_w"], r["x0_w"]) for g, r in zip(got, reference))
    test = data.ImageFolderDataset(tmp_path / "split", resolution=8, split="test")
    assert [it["prompt"] for it in _items(test)] == ["held out"]
    first2 = data.ImageFolderDataset(tmp_path / "split", resolution=8, max_train_samples=2)
    assert [it["prompt"] for it in _items(first2)] == ["red 0", "red 1"]

    _write_csv(tmp_path / "split" / "train" / "metadata.csv", ["file_name", "prompt", "caption"],
               [(f, t, "not this") for f, t in entries])
    chosen = data.ImageFolderDataset(tmp_path / "split", resolution=8, caption_column="prompt")
    assert [it["prompt"] for it in _items(chosen)] == [r["prompt"] for r in reference]
    _write_csv(tmp_path / "split" / "train" / "metadata.csv", ["file_name", "prompt"], entries)
    with pytest.raises(ValueError, match=r"no caption column 'text' nor its fallback 'caption'; "
                                         r"columns: \['file_name', 'prompt'\]"):
        data.ImageFolderDataset(tmp_path / "split", resolution=8)
    with pytest.raises(ValueError, match=r"no caption column 'words'"):
        data.ImageFolderDataset(tmp_path / "split", resolution=8, caption_column="words")
    with pytest.raises(FileNotFoundError, match=r"looked for ROOT/metadata.jsonl, ROOT/metadata.csv, "
                                                r"ROOT/valid/metadata.jsonl, ROOT/valid/metadata.csv"):
        data.ImageFolderDataset(tmp_path / "split", resolution=8, split="valid")


def _write_video(path, num_frames, size=(16, 16)):
    with av.open(str(path), "w") as c:
        stream = c.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for k in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 30 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


def test_video_folder_reads_the_imagefolder_layout(tmp_path):
    (tmp_path / "train" / "clips").mkdir(parents=True)
    _write_video(tmp_path / "train" / "clips" / "a.mp4", 4)
    _write_csv(tmp_path / "train" / "metadata.csv", ["file_name", "caption"], [("clips/a.mp4", "a clip")])
    item = data.video.VideoFolderDataset(tmp_path, num_frames=4, resolution=8)[0]
    assert item["prompt"] == "a clip" and item["x0_w"].shape == (3, 4, 8, 8)


# ------------------------------------------------------------------------------ through config


def _resolve(*argv):
    with warnings.catch_warnings():
        warnings.simplefilter("error", config.IgnoredSettingWarning)
        return config.resolve(argv=list(argv))


def test_magictime_csv_from_the_command_line(tmp_path):
    _write_video(tmp_path / "v1.mp4", 5)
    _write_video(tmp_path / "v2.mp4", 5)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "v1.mp4", "text": "not the csv"}) + "\n")
    (tmp_path / "caps.csv").write_text('videoid,name\nv2,"ice, melting"\nv1,a flower blooming\n')
    cfg = _resolve("--config=animatediff_magictime", f"--data_path={tmp_path}", "--num_frames=4",
                   "--resolution=8", f"--magictime_csv={tmp_path / 'caps.csv'}", "--max_train_samples=1")
    ds = builders.build_dataset(cfg)
    assert isinstance(ds, data.video.VideoFolderDataset) and len(ds) == 1
    assert ds[0]["prompt"] == "ice, melting" and ds[0]["x0_w"].shape == (3, 4, 8, 8)
    plain = builders.build_dataset(_resolve("--config=animatediff_magictime", f"--data_path={tmp_path}"))
    assert plain.entries == [("v1.mp4", "not the csv")]  # without the key: the metadata file
    with pytest.warns(config.IgnoredSettingWarning, match="only data 'videofolder' reads a MagicTime CSV"):
        config.resolve(argv=["--config=sd15_pickapic", "--data=imagefolder", "--method=sft",
                             f"--data_path={tmp_path}", f"--magictime_csv={tmp_path / 'caps.csv'}"])


def test_split_samples_and_caption_column_from_the_command_line(layouts, tmp_path):
    cfg = _resolve("--config=sd15_pickapic", "--method=dpo", f"--data_path={layouts['saved_dict']}",
                   "--dataset_split_name=validation", "--max_train_samples=1", "--resolution=8")
    ds = builders.build_dataset(cfg)
    assert isinstance(ds, data.PickAPicDataset) and [it["prompt"] for it in _items(ds)] == ["valid 0"]
    entries = _images(tmp_path / "folder" / "test")
    _write_csv(tmp_path / "folder" / "test" / "metadata.csv", ["file_name", "prompt"], entries)
    cfg = _resolve("--config=sd15_pickapic", "--data=imagefolder", "--method=sft", "--resolution=8",
                   f"--train_data_dir={tmp_path / 'folder'}", "--dataset_split_name=test",
                   "--caption_column=prompt", "--max_train_samples=3")
    ds = builders.build_dataset(cfg)
    assert [it["prompt"] for it in _items(ds)] == ["red 0", "red 1", "red 2"]
    with pytest.raises(ValueError, match="'max_train_samples' must be >= 0"):
        config.resolve(argv=["--max_train_samples=-1"])


def test_jsonl_files_name_the_bad_line(tmp_path):
    """metadata.jsonl and the video pairs.jsonl share one reader: a broken line is named by file and line."""
    import data.video
    from data.layouts import read_jsonl
    (tmp_path / "pairs.jsonl").write_text('{"text": "a", "winner": "w.mp4", "loser": "l.mp4"}\n\n{"text": 1}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: expected"):
        data.video._read_pairs(tmp_path)
    for bad, why in (("{oops", "not valid JSON"), ("[1, 2]", "expected a JSON object")):
        (tmp_path / "m.jsonl").write_text('{"file_name": "a.png"}\n' + bad + "\n")
        with pytest.raises(ValueError, match=rf"m.jsonl:2: {why}"):
            read_jsonl(tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").write_text('{"file_name": "a.png"}\n\n{"file_name": "b.png"}\n')
    assert read_jsonl(tmp_path / "m.jsonl") == [(1, {"file_name": "a.png"}), (3, {"file_name": "b.png"})]
