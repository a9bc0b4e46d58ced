"""Prompt sets from local files: Pick-a-Pic validation_unique, PartiPrompts, the HPSv2 benchmark,
or any CSV/TSV/JSON/JSONL/parquet/TXT list of captions (``evaluate.py generate --prompts``)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

CAPTION_COLUMNS = ("caption", "prompt", "Prompt", "text")
PROMPT_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")


def _rows_to_prompts(rows, path, column):
    if rows and all(isinstance(r, str) for r in rows):
        return list(rows)
    cols = [column] if column else list(CAPTION_COLUMNS)
    keys = set(rows[0]) if rows and isinstance(rows[0], dict) else set()
    col = next((c for c in cols if c in keys), None)
    if col is None:
        raise ValueError(f"{path}: no caption column; looked for {cols}, found {sorted(keys)}")
    return [str(r[col]) for r in rows]


def load_prompts(path, column: str | None = None, limit: int | None = None) -> list[str]:
    """Prompts from a local file or a folder of such files (sorted, concatenated).

    Pick-a-Pic validation_unique (parquet, `caption`), PartiPrompts.tsv (`Prompt`), HPSv2
    benchmark (a folder of JSON lists of strings), or any CSV/TSV/JSON/JSONL/parquet with a
    caption/prompt/Prompt/text column, or TXT with one prompt per line. Empty prompts are errors.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt set not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in PROMPT_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no prompt files ({', '.join(PROMPT_SUFFIXES)})")
        prompts = [p for f in files for p in load_prompts(f, column)]
    else:
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        elif suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict):  # {"prompts": [...]} or column-oriented {"caption": [...]}
                key = next((k for k in (column, "prompts", *CAPTION_COLUMNS) if k in rows), None)
                if key is None:
                    raise ValueError(f"{path}: JSON object without a prompts/caption list; keys {sorted(rows)}")
                rows = rows[key]
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif suffix == ".parquet":
            import pyarrow.parquet as pq
            rows = pq.read_table(path).to_pylist()
        elif suffix == ".txt":
            rows = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            raise ValueError(f"{path}: unsupported prompt file; use one of {', '.join(PROMPT_SUFFIXES)}")
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"{path}: expected a non-empty list of prompts or records")
        prompts = _rows_to_prompts(rows, path, column)
        empty = [i for i, p in enumerate(prompts) if not p.strip()]
        if empty:
            raise ValueError(f"{path}: empty prompt in row {empty[0]} ({len(empty)} empty in all)")
    return prompts[:limit] if limit else prompts
