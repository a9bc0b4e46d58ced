"""Where a data set lies on disk: the layouts accepted for Pick-a-Pic and for captioned folders.

Pick-a-Pic v2 (``find_pickapic``), looked for in this order:
    1. the hub snapshot that ``huggingface-cli download yuvalkirstain/pickapic_v2
       --repo-type dataset --local-dir ROOT`` writes: ``ROOT/data/{split}-*.parquet``
    2. the parquet folder itself: ``ROOT/{split}-*.parquet``
    3. a ``datasets`` ``save_to_disk`` directory of a DatasetDict:
       ``ROOT/dataset_dict.json`` and ``ROOT/{split}/state.json`` + ``data-*.arrow``
    4. a ``save_to_disk`` directory of one Dataset: ``ROOT/state.json`` + ``data-*.arrow``
Parquet shards are read one row group at a time; Arrow files are memory-mapped, as ``datasets``
itself reads them (research/data_reading.py compares these readers with ``datasets``; the numbers are in
results/data_reading.md).

Captioned folders (``find_metadata``), the ``datasets`` imagefolder conventions:
``metadata.jsonl`` or ``metadata.csv`` in ``ROOT`` or in ``ROOT/{split}``, a ``file_name`` column
(paths relative to the metadata file's folder) and a caption column (``caption_column``; the
default ``text`` falls back to ``caption``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import csv
import json
from pathlib import Path

import numpy as np

if TYPE_CHECKING:  # annotations only: Arrow loads with the first shard
    import pyarrow as pa
    import pyarrow.parquet as pq

PICKAPIC_LAYOUTS = (
    "ROOT/data/{split}-*.parquet (huggingface-cli download snapshot)",
    "ROOT/{split}-*.parquet (parquet folder)",
    "ROOT/dataset_dict.json + ROOT/{split}/state.json (datasets save_to_disk, DatasetDict)",
    "ROOT/state.json + data-*.arrow (datasets save_to_disk, one Dataset)",
)


class Shard:
    """One file of a table, read in blocks: ``starts`` (cumulative rows, (num_blocks+1,)),
    ``names`` (columns), ``read(columns)`` (whole columns), ``block(g, columns)`` (block g)."""

    def __init__(self, path: Path):
        self.path, self._handle = Path(path), None

    def __getstate__(self):  # an open file stays in its own process (DataLoader workers)
        return {**self.__dict__, "_handle": None}

    def __str__(self) -> str:
        return str(self.path)


class ParquetShard(Shard):
    def __init__(self, path: Path):
        super().__init__(path)
        pf = self._file()
        self.names = pf.schema_arrow.names
        self.starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])

    def _file(self) -> pq.ParquetFile:
        if self._handle is None:
            import pyarrow as pa  # Arrow loads when a shard is opened, not when the package is imported
            import pyarrow.parquet as pq
            try:
                self._handle = pq.ParquetFile(self.path)
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{self.path}: not a readable parquet file ({e})") from e
        return self._handle

    def read(self, columns: list[str]) -> pa.Table:
        return self._file().read(columns=columns)

    def block(self, g: int, columns: list[str]) -> pa.Table:
        return self._file().read_row_group(g, columns=columns)


class ArrowShard(Shard):
    """An Arrow IPC stream file as ``save_to_disk`` writes it, memory-mapped (zero copy: pages are
    read when an item touches them; the whole file is one block)."""

    def __init__(self, path: Path):
        super().__init__(path)
        table = self._table()
        self.names, self.starts = table.schema.names, np.array([0, table.num_rows])

    def _table(self) -> pa.Table:
        if self._handle is None:
            import pyarrow as pa  # as ParquetShard._file: Arrow loads with the first shard
            try:
                self._handle = pa.ipc.open_stream(pa.memory_map(str(self.path), "r")).read_all()
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{self.path}: not a readable Arrow stream file ({e})") from e
        return self._handle

    def read(self, columns: list[str]) -> pa.Table:
        return self._table().select(columns)

    def block(self, g: int, columns: list[str]) -> pa.Table:
        return self._table().select(columns)


def _saved_dataset(folder: Path, split: str | None) -> list[Shard]:
    """The Arrow files of one ``save_to_disk`` Dataset folder, in the order state.json lists them."""
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    saved_split = state.get("_split")
    if split is not None and saved_split not in (None, split):
        raise ValueError(f"{folder}: this saved Dataset is split {saved_split!r}, not the requested "
                         f"{split!r} (set --dataset_split_name={saved_split})")
    names = [d["filename"] for d in state.get("_data_files", [])] or sorted(p.name for p in folder.glob("data-*.arrow"))
    if not names:
        raise FileNotFoundError(f"{folder}: state.json lists no Arrow files")
    return [ArrowShard(folder / n) for n in names]


def find_pickapic(root, split: str = "train") -> list[Shard]:
    """The shards of Pick-a-Pic's ``split`` under ``root`` in any of ``PICKAPIC_LAYOUTS``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Pick-a-Pic root {root} is not a directory")
    for folder in (root / "data", root):
        files = sorted(folder.glob(f"{split}-*.parquet"))
        if files:
            return [ParquetShard(f) for f in files]
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        if split not in splits or not (root / split / "state.json").is_file():
            raise FileNotFoundError(f"{root}: the saved DatasetDict has splits {splits}, not {split!r} "
                                    f"(set --dataset_split_name)")
        return _saved_dataset(root / split, split)
    if (root / "state.json").is_file():
        return _saved_dataset(root, split)
    raise FileNotFoundError(f"{root}: no Pick-a-Pic split {split!r} found; looked for "
                            + "; ".join(p.replace("{split}", split) for p in PICKAPIC_LAYOUTS))


# ---------------------------------------------------------------------------------------------
# Captioned folders (images or videos)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def _rows(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """metadata.jsonl / metadata.csv -> ([(line number, row as a dict)], the column names)."""
    if path.suffix == ".csv":
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                return [(n, row) for n, row in enumerate(reader, 2)], list(reader.fieldnames or [])
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    rows = read_jsonl(path)
    columns = {k: None for _, obj in rows for k in obj}
    return rows, list(columns)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """[(line number, object)] of a JSON-lines file (blank lines skipped); a line that is not
    a JSON object is one error naming the file and line."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {line[:100]}")
        rows.append((n, obj))
    return rows


def find_metadata(root, split: str = "train") -> Path:
    """The metadata file of a captioned folder: ``root/metadata.{jsonl,csv}``, else the same in
    ``root/{split}`` (the ``datasets`` imagefolder layout with split folders)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    for folder in (root, root / split):
        for name in METADATA_FILES:
            if (folder / name).is_file():
                return folder / name
    looked = [f"ROOT/{name}" for name in METADATA_FILES] + [f"ROOT/{split}/{name}" for name in METADATA_FILES]
    raise FileNotFoundError(f"{root}: no captions found; looked for {', '.join(looked)} (a 'file_name' "
                            f"column and a caption column 'text' or 'caption')")


def read_captions(root, split: str = "train", caption_column: str = "text") -> tuple[Path, list[tuple[str, str]]]:
    """-> (folder the file names are relative to, [(file_name, caption)]). ``caption_column``
    "text" (the default) falls back to "caption" when the file has no "text" column."""
    path = find_metadata(root, split)
    rows, columns = _rows(path)
    if not rows:
        raise ValueError(f"{path}: no entries")
    column = caption_column
    if column not in columns and column == "text" and "caption" in columns:
        column = "caption"
    if column not in columns:
        tried = "'text' nor its fallback 'caption'" if caption_column == "text" else repr(caption_column)
        raise ValueError(f"{path}: no caption column {tried}; columns: {columns} (set --caption_column)")
    entries = []
    for n, row in rows:
        name, text = row.get("file_name"), row.get(column)
        if not (isinstance(name, str) and name and isinstance(text, str)):
            raise ValueError(f"{path}:{n}: expected a 'file_name' and a {column!r} string, got "
                             f"{json.dumps(row)[:100]}")
        entries.append((name, text))
    return path.parent, entries
