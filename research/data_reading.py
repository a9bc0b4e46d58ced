"""Pick-a-Pic reading: today's lazy parquet reader against the `datasets` library, on one large
local shard (made here: N rows of two small PNGs each, row groups of 100 rows as `datasets`
writes image data). Each variant runs in its own process so its peak resident memory is its own.

    python -m research.data_reading [--rows=20000] [--items=500] [--dir=/tmp/pickapic_bench]

Prints, per variant: seconds to open/index (for `datasets`: the conversion of the parquet shard
into its Arrow cache, and the cache's size on disk), seconds for ``items`` random accesses to a
winner's image bytes, and peak RSS in MB; and writes them to results/data_reading.md.
"""
from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_shard(root: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    path = root / "data" / "train-00000-of-00001.parquet"
    if path.is_file() and pq.ParquetFile(path).metadata.num_rows == rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def png():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()
    labels = rng.choice([0.0, 0.5, 1.0], size=rows, p=[0.44, 0.12, 0.44])
    table = pa.table({"caption": [f"caption {k}" for k in range(rows)],
                      "jpg_0": [png() for _ in range(rows)], "jpg_1": [png() for _ in range(rows)],
                      "label_0": labels, "label_1": 1.0 - labels})
    pq.write_table(table, path, row_group_size=100)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_variant(variant: str, root: Path, items: int) -> dict:
    import datasets  # imported before the clock and the memory baseline: both readers import torch
    import data
    base_mb, t0 = _peak_mb(), time.perf_counter()
    if variant == "parquet_lazy":  # data.PickAPicDataset's reader (index + row-group reads)
        ds = data.PickAPicDataset(root, mode="winners", resolution=8)
        get = lambda i: ds._image_bytes(int(ds.file_ids[i]), int(ds.rows[i]), f"jpg_{ds.winner[i]}")
        n, extra = len(ds), {}
    elif variant == "datasets_parquet":  # load_dataset("parquet"): converts to an Arrow cache first
        cache = root / "hf_cache"
        ds = datasets.load_dataset("parquet", data_files=str(root / "data" / "train-*.parquet"),
                                   split="train", cache_dir=str(cache))
        labels = np.asarray(ds.with_format("numpy")["label_0"])
        keep = np.flatnonzero((labels == 0.0) | (labels == 1.0))
        get = lambda i: ds[int(keep[i])]["jpg_0" if labels[keep[i]] == 1.0 else "jpg_1"]
        n = len(keep)
        extra = {"cache_mb": round(sum(p.stat().st_size for p in cache.rglob("*.arrow")) / 2**20, 1)}
    elif variant == "datasets_from_disk":  # a save_to_disk directory read with load_from_disk
        ds = datasets.load_from_disk(str(root / "saved"))
        labels = np.asarray(ds.with_format("numpy")["label_0"])
        keep = np.flatnonzero((labels == 0.0) | (labels == 1.0))
        get = lambda i: ds[int(keep[i])]["jpg_0" if labels[keep[i]] == 1.0 else "jpg_1"]
        n, extra = len(keep), {}
    elif variant == "arrow_mmap":  # the same directory read by data.PickAPicDataset (memory-mapped)
        ds = data.PickAPicDataset(root / "saved", mode="winners", resolution=8)
        get = lambda i: ds._image_bytes(int(ds.file_ids[i]), int(ds.rows[i]), f"jpg_{ds.winner[i]}")
        n, extra = len(ds), {}
    else:
        raise ValueError(variant)
    opened = time.perf_counter() - t0
    order = np.random.default_rng(1).integers(0, n, items)
    t0 = time.perf_counter()
    total = sum(len(get(i)) for i in order)
    access = time.perf_counter() - t0
    return {"variant": variant, "open_s": round(opened, 2), f"{items}_random_s": round(access, 3),
            "bytes": total, "peak_rss_mb": round(_peak_mb(), 1),
            "peak_rss_over_imports_mb": round(_peak_mb() - base_mb, 1), **extra}


def main(argv: list[str]) -> None:
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    root = Path(args.get("dir", "/tmp/pickapic_bench"))
    rows, items = int(args.get("rows", 20000)), int(args.get("items", 500))
    if "variant" in args:
        print(json.dumps(run_variant(args["variant"], root, items)))
        return
    make_shard(root, rows)
    if not (root / "saved" / "state.json").is_file():
        import datasets
        datasets.Dataset.from_parquet(str(root / "data" / "train-00000-of-00001.parquet"),
                                      cache_dir=str(root / "hf_cache_save")).save_to_disk(str(root / "saved"))
    results = []
    for variant in VARIANTS:
        import shutil
        shutil.rmtree(root / "hf_cache", ignore_errors=True)  # time the conversion every time
        out = subprocess.run([sys.executable, "-m", "research.data_reading", f"--variant={variant}", f"--dir={root}",
                              f"--items={items}"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        print(out.stdout.strip() or out.stderr.strip().splitlines()[-1])
        results.append(json.loads(out.stdout))
    lines = [f"# Reading Pick-a-Pic: {rows} rows (2 PNGs of 32x32 each, row groups of 100), "
             f"{items} random accesses to a winner's bytes", "",
             "Written by `python -m research.data_reading`; each reader in its own process. RSS over imports = peak "
             "resident memory minus the peak after `import torch, datasets`.", "",
             "| reader | open / index (s) | Arrow cache written (MB) | random access (s) | peak RSS over imports (MB) |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {VARIANTS[r['variant']]} | {r['open_s']} | {r.get('cache_mb', 0)} | "
                     f"{r[f'{items}_random_s']} | {r['peak_rss_over_imports_mb']} |")
    lines += ["", "Kept: the project's own readers (no `datasets` at training time). `load_dataset('parquet')` "
              "answers random access much faster than the lazy parquet reader but first copies every shard into an Arrow cache (the whole "
              "335 GB train split for Pick-a-Pic) and holds the most memory; on a save_to_disk directory "
              "the memory-mapped Arrow reader does what `load_from_disk` does, faster and with less "
              "memory. The lazy parquet reader pays a row-group read per random item (the column above, "
              "over 500 items), small beside decoding a full-size image and a training step."]
    out_path = Path(__file__).resolve().parents[1] / "results" / "data_reading.md"
    out_path.write_text("\n".join(lines) + "\n")
    print(f"wrote {out_path}")


VARIANTS = {
    "parquet_lazy": "data.PickAPicDataset on the parquet shards (row group per read)",
    "datasets_parquet": "datasets.load_dataset('parquet') (converts to an Arrow cache first)",
    "datasets_from_disk": "datasets.load_from_disk on a save_to_disk directory",
    "arrow_mmap": "data.PickAPicDataset on the same save_to_disk directory (memory-mapped)",
}


if __name__ == "__main__":
    main(sys.argv[1:])
