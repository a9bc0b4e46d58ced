"""Every file path that the code's docstrings and comments, or the repository's Markdown, name
exists in the tree: a reader who follows a pointer finds the file (moves and renames leave none
dangling), and no pointer leads outside the repository."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", "runs", "cache", "__pycache__", ".pytest_cache"}
# File names of other projects that the text cites as such (never paths in this tree).
ELSEWHERE = {"train_diffusion_dpo.py", "train_text_to_image_lora.py", "train_text_to_image.py",
             "train_text_to_image_sdxl.py", "train_dreambooth_lora.py", "trainers.py", "model.py",
             "gaussian_diffusion.py", "losses.py", "train_util.py", "dist_util.py", "setup.py",
             "train_text_to_image_lora_sdxl.py", "CHANGELOG.md", "pipeline_wan.py", "pipeline_cogvideox.py"}
PATH = re.compile(r"(?<![\w./-])((?:\.{0,2}/)?[A-Za-z_][\w.-]*(?:/[\w.-]+)*\.(?:py|md))\b")


def _files(suffix: str) -> list[Path]:
    return [p for p in ROOT.rglob(f"*{suffix}")
            if not SKIP & set(p.relative_to(ROOT).parts) and not any(
                part.startswith(".") or part.endswith("venv") for part in p.relative_to(ROOT).parts[:-1])]


def _python_texts(path: Path) -> list[str]:
    """Docstrings and comments of a Python file (where a reader is pointed to other files)."""
    src = path.read_text()
    texts = [ast.get_docstring(n, clean=False) or "" for n in ast.walk(ast.parse(src))
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    texts += [t.string for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT]
    return texts


def _named_paths(text: str) -> list[str]:
    return [m.group(1) for m in PATH.finditer(text)]


def _exists(name: str, where: Path) -> bool:
    if name.split("/")[-1] in ELSEWHERE or name.startswith(("http", "www.")):
        return True
    name = name.removeprefix("./")
    candidates = [ROOT / name, where.parent / name]
    if "/" not in name:  # a bare file name: anywhere in the tree it is unique to
        candidates += list(ROOT.glob(f"*/{name}"))
    return any(c.exists() for c in candidates)


def test_every_named_path_exists():
    missing = []
    for path in _files(".py"):
        for text in _python_texts(path):
            missing += [f"{path.relative_to(ROOT)}: {n}" for n in _named_paths(text) if not _exists(n, path)]
    for path in _files(".md"):
        missing += [f"{path.relative_to(ROOT)}: {n}" for n in _named_paths(path.read_text()) if not _exists(n, path)]
    assert not missing, "paths named but not in the tree:\n" + "\n".join(sorted(set(missing)))


def test_nothing_points_outside_the_repository():
    bad = [str(p.relative_to(ROOT)) for p in _files(".py") + _files(".md")
           if p.name != "test_paths.py" and re.search(r"DESIGN\.md|\.\./shared|REAL_CONFIGS\.md|STYLE\.md", p.read_text())]
    assert not bad, f"files that point outside the repository: {bad}"


def test_no_issue_numbers_in_the_code():
    """Comments and docstrings speak of the code as it is: no tracker numbers (git keeps history)."""
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in _files(".py") if p.name != "test_paths.py"
           for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bissue\s+#?\d+", line, re.I)]
    assert not bad, f"issue numbers in: {bad}"
