"""What a cluster, a shared checkpoint, a second run or a bad file can do to a run.

Each test failed on the code before its fix. Digits runs are tiny (a
5-update base, 4 updates, checkpoints at 2 and 4); the one sd15 test uses the random tiny SD-1.5
stand-in in the real layout."""

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_GUARD_S, signal_after_step
import torch
from PIL import Image
from safetensors.torch import load_file

from infra import checkpoints
import config
import data
import digits
import train
from models import sd15

FAST = dict(digits_base_steps=5, batch_size=4, loser_steps=4, log_every=1, sample_every=0,
            save_every=2, max_steps=4, lr=1e-3)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished SSPO digits run (checkpoints at steps 2 and 4) and the cache it used."""
    cache = str(tmp_path_factory.mktemp("cache"))
    out = tmp_path_factory.mktemp("run")
    train.run({**FAST, "method": "sspo", "cache_dir": cache, "out_dir": str(out)})
    return cache, out


@pytest.fixture
def copy(finished, tmp_path):
    """A private copy of the finished run: (its argv for train.main, its directory). (train.main
    judges a finished digits run, which takes a while: tests that finish one call train.run.)"""
    cache, out = finished
    dst = tmp_path / "run"
    shutil.copytree(out, dst)
    argv = [f"--{k}={v}" for k, v in {**FAST, "method": "sspo", "cache_dir": cache, "out_dir": dst}.items()]
    return argv, dst


def _resume(argv, *more):
    return train.run(argv=argv + ["--resume", *more])


def _ck(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:06d}"


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this calls os.system
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------ 1. a checkpoint cannot run code

def test_1_a_crafted_checkpoint_runs_nothing(copy, tmp_path, capsys):
    argv, out = copy
    marker = tmp_path / "pwned"
    for step in (2, 4):  # a crafted pickle where the old format kept the training state
        torch.save({"step": step, "x": _Evil(marker)}, _ck(out, step) / "state.pt")
    _resume(argv)
    assert not marker.exists()
    assert "resumed from step 4" in capsys.readouterr().out
    # the format: tensors in safetensors, everything else JSON; packing refuses other objects
    assert sorted(p.name for p in _ck(out, 4).iterdir()) == [
        "state.json", "state.pt", "state.safetensors", "trainable.safetensors"]
    with pytest.raises(TypeError, match="cannot store a _Evil"):
        checkpoints.pack_state({"x": _Evil(marker)}, {})


# ------------------------------------------------------------------ 2. a lost `latest` pointer

def test_2_lost_latest_pointer_resumes_from_newest_complete(copy, capsys):
    argv, out = copy
    (out / "checkpoints" / "latest").unlink()
    before = (_ck(out, 2) / "trainable.safetensors").stat().st_mtime_ns
    _resume(argv, "--max_steps=5")
    assert "resumed from step 4" in capsys.readouterr().out
    assert (_ck(out, 2) / "trainable.safetensors").stat().st_mtime_ns == before  # not rewritten
    assert checkpoints.latest_step(out) == 5


# ------------------------------------------------------------------ 3. a truncated newest checkpoint

def test_3_truncated_checkpoint_falls_back_then_refuses(copy, capsys):
    argv, out = copy
    f = _ck(out, 4) / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a partial copy
    _resume(argv)
    o = capsys.readouterr().out
    warn = [line for line in o.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "step_000004" in warn[0] and "trainable.safetensors is" in warn[0]
    assert "resumed from step 2" in o
    for step in (2, 4):  # now every checkpoint is damaged: refuse, one line, exit code 2
        g = _ck(out, step) / "state.safetensors"
        g.write_bytes(g.read_bytes()[:100])
    assert train.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: resume: no usable checkpoint") and "Traceback" not in err[0]


# ------------------------------------------------------------------ 4. SIGTERM is not success

def test_4_sigterm_exits_143_and_never_prints_done(finished, tmp_path, monkeypatch, capsys):
    signal_after_step(monkeypatch, signal.SIGTERM)
    argv = [f"--{k}={v}" for k, v in {**FAST, "method": "sft", "max_steps": 10, "save_every": 100,
                                       "cache_dir": finished[0], "out_dir": tmp_path}.items()]
    assert train.main(argv) == 143
    o = capsys.readouterr().out
    assert "preempted at step 3, checkpoint saved" in o and "done:" not in o
    assert checkpoints.latest_step(tmp_path) == 3


# ------------------------------------------------------------------ 5. sd15 resume is bitwise

def _write_pickapic(root: Path, n: int = 6):
    import io
    import pyarrow as pa
    import pyarrow.parquet as pq

    def jpeg(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
        return buf.getvalue()
    root.mkdir(parents=True)
    pq.write_table(pa.table({"caption": [f"photo {i}" for i in range(n)], "jpg_0": [jpeg(2 * i) for i in range(n)],
                             "jpg_1": [jpeg(2 * i + 1) for i in range(n)], "label_0": [1.0, 0.0] * (n // 2)}),
                   root / "train-00000-of-00001.parquet")


def test_5_sd15_resume_is_bitwise(tmp_path):
    sd = sd15.write_tiny(str(tmp_path / "sd15"))
    _write_pickapic(tmp_path / "pickapic")
    args = dict(model="sd15", model_path=sd, data="pickapic", data_path=str(tmp_path / "pickapic"), method="dpo",
                max_steps=3, batch_size=2, save_every=2, resolution=16, log_every=1, sample_every=0,
                num_sample_prompts=1, lr=1e-3)
    train.run({**args, "out_dir": str(tmp_path / "straight")})
    train.run({**args, "max_steps": 2, "out_dir": str(tmp_path / "split")})
    train.run({**args, "resume": True, "out_dir": str(tmp_path / "split")})
    a = load_file(str(_ck(tmp_path / "straight", 3) / "trainable.safetensors"))
    b = load_file(str(_ck(tmp_path / "split", 3) / "trainable.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ 6. metrics.jsonl after a resume

def test_6_resume_truncates_metrics_to_the_checkpoint(copy):
    argv, out = copy
    shutil.rmtree(_ck(out, 4))  # killed after logging steps 3-4, before their checkpoint
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss"')  # and a torn last line
    _resume(argv)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


# ------------------------------------------------------------------ 7. replay snapshots stored once

def test_7_replay_snapshots_are_files_written_once(finished):
    out = finished[1]
    files = sorted(p.name for p in (out / "replay").glob("*.safetensors"))
    assert files == ["replay_0000_step00000000.safetensors", "replay_0001_step00000002.safetensors",
                     "replay_0002_step00000004.safetensors"]
    for step, n in ((2, 2), (4, 3)):
        manifest = json.loads((_ck(out, step) / "state.json").read_text())
        assert manifest["state"]["pool"]["files"] == files[:n]  # named, not copied
        state = load_file(str(_ck(out, step) / "state.safetensors"))
        weights = load_file(str(_ck(out, step) / "trainable.safetensors"))
        n_state, n_weights = (sum(v.numel() for v in d.values()) for d in (state, weights))
        assert n_state < 2.1 * n_weights  # AdamW's two moments and RNG state, no model copies


# ------------------------------------------------------------------ 8. 16-bit images

def test_8_sixteen_bit_png_keeps_its_range(tmp_path):
    arr = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))  # black -> white ramp
    Image.fromarray(arr).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "ramp16.png", "text": "ramp"}) + "\n")
    x = data.ImageFolderDataset(tmp_path, resolution=16)[0]["x0_w"]  # (3,16,16) in [-1,1]
    want = torch.from_numpy(np.round(arr[0] / 257.0).astype(np.float32)) / 127.5 - 1
    assert torch.allclose(x[0, 8], want, atol=1e-6) and torch.equal(x[0], x[2])
    assert abs(float(x.mean())) < 0.02  # not saturated to white


# ------------------------------------------------------------------ 9. the bad-sample budget

def test_9_bad_samples_counted_once_and_stop_in_one_line(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "ok.png")
    (tmp_path / "bad1.png").write_bytes(b"not a png")
    lines = [json.dumps({"file_name": n, "text": "t"}) for n in ["ok.png"] * 3 + ["bad1.png"]]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = data.ImageFolderDataset(tmp_path, resolution=8, max_bad_fraction=0.015)  # budget 1.5
    for _ in range(3):  # three epochs re-read the same bad file: still one bad sample
        assert [ds[i] is None for i in range(4)] == [False, False, False, True]
    assert ds.bad == [str(tmp_path / "bad1.png")]
    (tmp_path / "bad2.png").write_bytes(b"")
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines + [json.dumps({"file_name": "bad2.png", "text": "t"})]))
    ds = data.ImageFolderDataset(tmp_path, resolution=8, max_bad_fraction=0.015)
    ds[3]
    with pytest.raises(data.TooManyBadItems) as e:
        ds[4]
    msg = str(e.value)
    assert "\n" not in msg and "2 of 2 distinct" in msg and "budget of 1.5" in msg and "bad1.png" in msg
    # train.main: one line and exit code 2, also when a DataLoader worker wrapped the message
    wrapped = "Caught TooManyBadItems in DataLoader worker process 0.\nOriginal Traceback ...\n" \
              f"data.TooManyBadItems: {msg}"
    monkeypatch.setattr(train, "train", lambda cfg, ctx: (_ for _ in ()).throw(data.TooManyBadItems(wrapped)))
    assert train.main(["--init=scratch", f"--out_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {msg}"


# ------------------------------------------------------------------ 10. skips are logged

def test_10_logging_configured_with_skip_counts_per_epoch(finished, tmp_path, monkeypatch, capsys):
    real_get = digits.DigitsDataset.__getitem__
    monkeypatch.setattr(digits.DigitsDataset, "__len__", lambda self: 8)  # 2 batches per epoch

    def get(self, i):
        if i == 5:
            data.log.warning("skipping item %d: unreadable (test)", i)
            return None
        return real_get(self, i)

    monkeypatch.setattr(digits.DigitsDataset, "__getitem__", get)
    train.run({**FAST, "method": "sft", "max_steps": 4, "cache_dir": finished[0], "out_dir": str(tmp_path)})
    text = (tmp_path / "logs" / "rank0.log").read_text()
    assert "skipping item 5: unreadable (test)" in text
    assert "epoch 0: 1 unreadable items skipped on rank 0" in text  # (epoch 1 ends with the run)
    assert "epoch 0: 1 unreadable items skipped" in capsys.readouterr().err  # rank 0's console


# ------------------------------------------------------------------ 11. filesystem errors

def test_11_filesystem_errors_are_one_line_and_keep_the_run(copy, tmp_path, monkeypatch, capsys):
    argv, out = copy
    (tmp_path / "a_file").write_text("x")
    assert train.main(argv + [f"--out_dir={tmp_path / 'a_file' / 'run'}"]) == 2  # not a directory
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Not a directory" in err[0] and "a_file" in err[0]
    assert train.main(argv + ["--config=sd15_pickapic", "--loser_every=1", f"--model_path={tmp_path}",
                              f"--data_path={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'r2'}"]) == 2
    lines = [l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0]  # (the digits keys warn)
    # a full disk while writing the step 6 checkpoint: one line, exit 2, steps 2 and 4 intact
    real = checkpoints.save_file

    def full(tensors, path, *a, **k):
        if "step_000006" in str(path):
            raise OSError(28, "No space left on device", path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoints, "save_file", full)
    assert train.main(argv + ["--resume", "--max_steps=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "step 6" in err[0]
    assert checkpoints.latest_step(out) == 4 and not list((out / "checkpoints").glob(".tmp*"))
    checkpoints.read_checkpoint(_ck(out, 4))  # still complete


# ------------------------------------------------------------------ 12. bad numbers

@pytest.mark.parametrize("arg,field", [("--max_grad_norm=nan", "max_grad_norm"), ("--lr=inf", "lr"),
                                       ("--beta=-5", "beta"), ("--batch_size=0", "batch_size"),
                                       ("--adam_beta2=1.5", "adam_beta2"), ("--tau=nan", "tau")])
def test_12_bad_numbers_refused_naming_the_field(arg, field, capsys):
    with pytest.raises(ValueError, match=f"config key '{field}'"):
        config.resolve(argv=[arg])
    assert train.main([arg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]
    assert config.resolve(argv=["--eps_clip=inf", "--max_grad_norm=inf"]).eps_clip == float("inf")


# ================================================================== one writer, lost data, garbage

def _lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


def test_a_second_writer_is_refused_and_changes_nothing(copy, capsys):
    import fcntl
    argv, out = copy
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live run holds the folder
    try:
        for more in (["--overwrite"], ["--resume", "--max_steps=6"]):
            assert train.main(argv + more) == 2
            err = _lines(capsys.readouterr().err)
            assert len(err) == 1 and "in use by another run" in err[0] and "Traceback" not in err[0]
    finally:
        os.close(fd)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == \
        {p: t for p, t in before.items() if p.name != ".lock"}
    _resume(argv, "--max_steps=5")  # once the lock is free: a run again (and it releases the lock)
    _resume(argv, "--max_steps=6")
    assert checkpoints.latest_step(out) == 6


def test_a_run_killed_before_its_first_checkpoint_leaves_nothing_behind(finished, tmp_path):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "replay").mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    (out / "samples" / "step_000002.png").write_bytes(b"old")
    (out / "replay" / "replay_0001_step00000002.safetensors").write_bytes(b"old")
    train.run({**FAST, "method": "sspo", "cache_dir": finished[0], "out_dir": str(out), "resume": True})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert not (out / "samples" / "step_000002.png").exists()
    assert load_file(str(out / "replay" / "replay_0001_step00000002.safetensors"))  # rewritten by this run


def test_temporaries_of_killed_writes_are_swept_at_start(copy):
    argv, out = copy
    junk = [out / "checkpoints" / ".tmp_step_000006_4242", out / "final.tmp"]
    for d in junk:
        d.mkdir()
        (d / "trainable.safetensors").write_bytes(b"x" * 1000)
    junk += [out / "replay" / "replay_0003_step00000006.4242.tmp", out / "checkpoints" / "latest.tmp",
             out / "metrics.jsonl.tmp"]
    for f in junk[2:]:
        f.write_bytes(b"x")
    _resume(argv, "--max_steps=5")
    assert [p for p in junk if p.exists()] == []
    assert checkpoints.latest_step(out) == 5


def test_a_lost_replay_snapshot_is_rebuilt_never_rolled_back(copy, capsys):
    argv, out = copy
    snap = out / "replay" / "replay_0001_step00000002.safetensors"
    want = snap.read_bytes()
    snap.unlink()
    newest = (_ck(out, 4) / "trainable.safetensors").read_bytes()
    _resume(argv)
    assert "resumed from step 4" in capsys.readouterr().out
    assert snap.read_bytes() == want  # rebuilt from checkpoints/step_000002, byte for byte
    assert (_ck(out, 4) / "trainable.safetensors").read_bytes() == newest
    for f in (snap, _ck(out, 2) / "trainable.safetensors"):  # neither copy left: refuse, keep step 4
        f.unlink()
    assert train.main(argv + ["--resume", "--max_steps=6"]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "replay_0001_step00000002" in err[0] and "Traceback" not in err[0]
    assert (_ck(out, 4) / "trainable.safetensors").read_bytes() == newest


def test_ctrl_c_saves_and_exits_130(finished, tmp_path, monkeypatch, capsys):
    signal_after_step(monkeypatch, signal.SIGINT)
    argv = [f"--{k}={v}" for k, v in {**FAST, "method": "sft", "max_steps": 10, "save_every": 100,
                                       "cache_dir": finished[0], "out_dir": tmp_path}.items()]
    assert train.main(argv) == 130
    o = capsys.readouterr()
    assert "interrupted (Ctrl-C) at step 3, checkpoint saved" in o.out and "done:" not in o.out
    assert "Traceback" not in o.err
    assert checkpoints.latest_step(tmp_path) == 3


def _recraft(d: Path, name: str, tensors: dict | None = None, raw: bytes | None = None, **manifest) -> None:
    """Replace ``name`` in checkpoint ``d`` and make state.json agree with it (sizes, checksums)."""
    from safetensors.torch import save_file
    save_file(tensors, str(d / name)) if tensors is not None else (d / name).write_bytes(raw)
    m = json.loads((d / "state.json").read_text())
    m["files"][name] = (d / name).stat().st_size
    if "crc32" in m:
        m["crc32"][name] = checkpoints.file_crc32(d / name)
    m.update(manifest)
    (d / "state.json").write_text(json.dumps(m))


def _falls_back_to_2(argv, capsys, why: str):
    _resume(argv)
    o = capsys.readouterr().out
    warn = [line for line in o.splitlines() if line.startswith("warning:")]
    assert "resumed from step 2" in o and len(warn) == 1 and "step_000004" in warn[0] and why in warn[0], o


def test_a_wrong_shape_is_refused_not_broadcast(copy, capsys):
    from models import sharding
    argv, out = copy
    w = load_file(str(_ck(out, 4) / "trainable.safetensors"))
    key = next(k for k, v in w.items() if v.ndim == 1 and v.numel() > 1)
    _recraft(_ck(out, 4), "trainable.safetensors", {**w, key: torch.tensor([1234.5])})
    _falls_back_to_2(argv, capsys, "shape (1,)")
    with pytest.raises(ValueError, match="dtype"):  # the replay pool's loads go through the same copy
        sharding.copy_full_(torch.zeros(4), torch.zeros(4, dtype=torch.float64), "w")


@pytest.mark.parametrize("damage", ["bitflip", "step", "nan"])
def test_silent_damage_is_caught_and_falls_back(copy, capsys, damage):
    argv, out = copy
    d = _ck(out, 4)
    if damage == "bitflip":  # same size, flipped bytes in the tensor data
        b = bytearray((d / "trainable.safetensors").read_bytes())
        for i in range(len(b) // 2, len(b) // 2 + 64):
            b[i] ^= 0xFF
        (d / "trainable.safetensors").write_bytes(bytes(b))
        _falls_back_to_2(argv, capsys, "CRC-32")
    elif damage == "step":
        m = json.loads((d / "state.json").read_text())
        (d / "state.json").write_text(json.dumps({**m, "step": 999}))
        _falls_back_to_2(argv, capsys, "step 999")
    else:
        w = load_file(str(d / "trainable.safetensors"))
        key = next(iter(w))
        _recraft(d, "trainable.safetensors", {**w, key: torch.full_like(w[key], float("nan"))})
        _falls_back_to_2(argv, capsys, "NaN")


def test_a_damaged_replay_snapshot_is_caught_at_resume(copy, tmp_path, capsys):
    import replay
    argv, out = copy
    snap = out / "replay" / "replay_0002_step00000004.safetensors"
    b = bytearray(snap.read_bytes())
    b[-100] ^= 0xFF
    snap.write_bytes(bytes(b))
    _resume(argv)  # rebuilt from checkpoints/step_000004, which holds the same weights
    assert "resumed from step 4" in capsys.readouterr().out
    assert checkpoints.file_crc32(snap) == json.loads((_ck(out, 4) / "state.json").read_text())["state"]["pool"]["crc32"][2]
    pool = replay.CheckpointPool("uniform", storage="disk", directory=str(tmp_path / "pool"))
    pool.add({"w": torch.arange(64.0)}, 0)
    state = pool.state_dict()
    f = tmp_path / "pool" / state["files"][0]
    b = bytearray(f.read_bytes())
    b[-8] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises((ValueError, FileNotFoundError), match="damaged"):  # found at resume, not when drawn
        replay.CheckpointPool("uniform", storage="disk", directory=str(tmp_path / "pool")).load_state_dict(state)


@pytest.mark.parametrize("arg", ["--adam_beta2=0.5", "--digits_base_steps=6", "--weight_decay=0.1"])
def test_resume_refuses_settings_it_cannot_honour(copy, capsys, arg):
    argv, out = copy
    before = (_ck(out, 4) / "state.json").read_text()
    assert train.main(argv + ["--resume", "--max_steps=6", arg]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "--resume with a config that changes the run" in err[0] and arg[2:].split("=")[0] in err[0]
    assert checkpoints.latest_step(out) == 4 and (_ck(out, 4) / "state.json").read_text() == before


# ================================================================== what the data may open

def test_data_files_outside_the_data_folder_are_skipped_and_counted(tmp_path):
    root, secret = tmp_path / "data", tmp_path / "secret"
    root.mkdir(), secret.mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(secret / "private.png")
    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "ok.png")
    (root / "link.png").symlink_to(secret / "private.png")
    names = ["ok.png", "../secret/private.png", str(secret / "private.png"), "link.png", "../../../../etc/passwd"]
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "t"}) + "\n" for n in names))
    ds = data.ImageFolderDataset(root, resolution=8, max_bad_fraction=1.0)
    assert [ds[i] is None for i in range(len(names))] == [False, True, True, True, True]
    assert len(ds.bad) == 4 and ds.num_skipped == 4


def test_images_over_the_pixel_cap_are_skipped_before_decoding(tmp_path, monkeypatch):
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "small.png")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "t"}) + "\n"
                                                     for n in ("big.png", "small.png")))
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    ds = data.ImageFolderDataset(tmp_path, resolution=8, max_bad_fraction=1.0, max_image_pixels=1000)
    assert ds[0] is None and ds[1] is not None and (40, 30) not in decoded
    assert ds.bad == [str(tmp_path / "big.png")] and ds.num_skipped == 1
    assert config.resolve(argv=[]).max_image_pixels == 64_000_000  # a setting, on by default


# ================================================================== messages that keep their cause

def _train_py(*argv, timeout=HANG_GUARD_S):
    """train.py as a user runs it: (exit code, stdout, stderr)."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "train.py"), *map(str, argv)], cwd=root, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return p.returncode, p.stdout, p.stderr


@pytest.mark.slow
def test_command_line_errors_keep_their_cause(tmp_path):
    _write_pickapic(tmp_path / "pickapic")
    rc, _, err = _train_py("--config=sd15_pickapic", f"--model_path={tmp_path / 'sd15'}",
                           f"--data_path={tmp_path / 'pickapic'}", f"--out_dir={tmp_path / 'run'}")
    assert rc == 2 and "Traceback" not in err
    assert "does not exist" in err and "model_index.json" in err and "local_files_only" in err  # the whole message
    for arg, want in (("--lr=1e300", "config key 'lr' must be <= 1"), ("--mixed_precision=fp16", "needs a GPU")):
        rc, out, err = _train_py(arg, "--max_steps=2", "--digits_base_steps=5", f"--cache_dir={tmp_path / 'cache'}",
                                 f"--out_dir={tmp_path / 'digits'}")
        assert rc == 2 and want in err and "Traceback" not in err and "done:" not in out, (arg, err[-500:])


def test_data_errors_name_their_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl: not UTF-8"):
        data.ImageFolderDataset(tmp_path / "img", resolution=8)
    (tmp_path / "pp").mkdir()
    pq.write_table(pa.table({"caption": [1, 2], "jpg_0": [b"", b""], "jpg_1": [b"", b""], "label_0": [1.0, 0.0]}),
                   tmp_path / "pp" / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match="column 'caption' holds int64"):
        data.PickAPicDataset(tmp_path / "pp", resolution=8)


@pytest.mark.parametrize("fault", ["safetensors", "worker"])
def test_write_and_worker_failures_are_one_message(tmp_path, monkeypatch, capsys, fault):
    from safetensors import SafetensorError
    boom = SafetensorError("Error while serializing: IoError(No space left on device)") if fault == "safetensors" \
        else RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    monkeypatch.setattr(train, "train", lambda cfg, ctx: (_ for _ in ()).throw(boom))
    assert train.main(["--init=scratch", f"--out_dir={tmp_path / 'run'}"]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and str(boom) in err[0] and "Traceback" not in err[0]


# ================================================================== a config path, a hung rank

@pytest.mark.slow
def test_a_config_path_is_data_never_code(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "x.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nCONFIG = {{}}\n")
    rc, _, err = _train_py(f"--config={tmp_path / 'x.py'}", "--max_steps=1", f"--out_dir={tmp_path / 'run'}")
    assert rc == 2 and not marker.exists() and ".json" in err and "Traceback" not in err
    (tmp_path / "mine.json").write_text(json.dumps({"method": "dpo", "beta": 123.0}))
    (tmp_path / "mine.toml").write_text('method = "dpo"\nbeta = 123.0\n')
    for f in ("mine.json", "mine.toml"):
        cfg = config.resolve({"config": str(tmp_path / f)})
        assert (cfg.method, cfg.beta) == ("dpo", 123.0)
    assert config.resolve({"config": "sd15_pickapic", "data_path": "/x"}).model == "sd15"  # presets by name


def test_dist_timeout_reaches_init_process_group(tmp_path, monkeypatch):
    import datetime
    import torch.distributed as dist
    seen = {}

    class Stop(Exception):
        pass

    def init(backend, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Stop):
        train.run(argv=["--dist_timeout=7", f"--out_dir={tmp_path}"])
    assert seen["timeout"] == datetime.timedelta(seconds=7)
    assert config.Config().dist_timeout == 1800
