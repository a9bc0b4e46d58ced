"""What a diffusers user expects of a run: a LoRA run's final/ and checkpoints load with plain
diffusers and change the image; evaluate.py applies LoRA adapters and checkpoints (and refuses
weights with no LoRA keys); TensorBoard / W&B logging; the diffusers scripts' flag names and LR
schedules; resuming from a chosen checkpoint; the model card and the SD-1.5 tokenizer files."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import config
import evaluate
from infra import export
import models
from infra import runtime
import train
from models import animatediff, sd15

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import HANG_GUARD_S  # noqa: E402
from test_train import FAST, _write_pickapic  # noqa: E402

# Plain diffusers, no project import: the base image, then the same seed with the adapter.
PLAIN_DIFFUSERS = r"""
import sys, numpy as np, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
kw = dict(prompt="a photo of a cat", num_inference_steps=3, output_type="np")
base = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
pipe.load_lora_weights(sys.argv[2])
assert pipe.get_list_adapters()["unet"], "no adapter loaded"
lora = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
print("DIFF", float(np.abs(base - lora).mean()))
"""


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """The issue's "Done when" command (plus a fast, large learning rate so 4 updates matter)."""
    tmp = tmp_path_factory.mktemp("eco")
    sd = sd15.write_tiny(str(tmp / "sd15"))
    _write_pickapic(tmp / "pickapic")
    argv = ["--config=sd15_pickapic", f"--model_path={sd}", f"--data_path={tmp / 'pickapic'}", "--method=dpo",
            "--lora_rank=4", "--max_steps=4", "--resolution=16", "--report_to=tensorboard", f"--out_dir={tmp / 'run'}",
            # fast on a CPU: no accumulation, no warm-up, a learning rate that moves the adapter
            "--grad_accum=1", "--warmup_steps=0", "--learning_rate=1e-2", "--num_workers=0", "--log_every=1",
            "--checkpointing_steps=2", "--sample_every=2", "--num_sample_prompts=2", "--mixed_precision=no"]
    assert train.main(argv) == 0
    return sd, tmp / "run"


def test_lora_final_loads_in_plain_diffusers_and_changes_the_image(lora_run):
    sd, run = lora_run
    final = run / "final"
    assert (final / export.LORA_FILE).is_file() and not (final / "model_index.json").exists()
    keys = load_file(str(final / export.LORA_FILE)).keys()
    assert keys and all(k.startswith("unet.") and ".lora." in k for k in keys)
    r = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, sd, str(final)], capture_output=True, text=True,
                       timeout=HANG_GUARD_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    diff = float(r.stdout.split("DIFF")[-1])
    assert diff > 1e-3, diff
    # the exported last checkpoint is the same file content as final/
    export.export_checkpoint(run / "checkpoints" / "step_000004", run / "exported")
    a, b = load_file(str(final / export.LORA_FILE)), load_file(str(run / "exported" / export.LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _gen(pipe, out: Path) -> np.ndarray:
    evaluate.generate(pipe, ["a photo of a cat"], out, num_inference_steps=3)
    from PIL import Image
    return np.asarray(Image.open(out / "images" / "00000.png"), dtype=float)


def test_evaluate_applies_lora_checkpoints_and_refuses_non_lora(lora_run, tmp_path):
    sd, run = lora_run
    base = _gen(evaluate.load_pipeline("sd15", sd), tmp_path / "base")
    with_lora = _gen(evaluate.load_pipeline("sd15", sd, lora=run / "final"), tmp_path / "lora")
    assert np.abs(base - with_lora).mean() > 0.1  # the adapter is applied (0 before the fix)
    # the same adapter reached three ways gives the same image
    step4 = run / "checkpoints" / "step_000004"
    assert np.array_equal(with_lora, _gen(evaluate.load_pipeline("sd15", sd, lora=step4), tmp_path / "l4"))
    assert np.array_equal(with_lora, _gen(evaluate.load_pipeline("sd15", step4), tmp_path / "c4"))
    assert np.array_equal(with_lora, _gen(evaluate.load_pipeline("sd15", run / "final"), tmp_path / "f"))
    # an intermediate checkpoint is evaluable and differs from the last one
    step2 = _gen(evaluate.load_pipeline("sd15", run / "checkpoints" / "step_000002"), tmp_path / "c2")
    assert not np.array_equal(step2, with_lora)
    # weights without LoRA keys: one line, exit code 2 (diffusers alone would load nothing, silently)
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2)}, str(tmp_path / "full.safetensors"))
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["generate", "--checkpoint", sd, "--lora", str(tmp_path / "full.safetensors"),
                       "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="no LoRA keys in .*full.safetensors"):
        evaluate.lora_weights(tmp_path / "full.safetensors")


def test_tensorboard_has_every_scalar_and_the_sample_grids(lora_run):
    _, run = lora_run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = list((run / "logs").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run / "logs"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = set(acc.Tags()["scalars"])
    assert {f"train/{k}" for k in rows[0] if k not in ("step", "time")} <= scalars
    assert {"train/loss", "train/implicit_acc", "train/lr", "train/grad_norm", "train/samples_per_sec"} <= scalars
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows])
    assert [e.step for e in acc.Images("validation/samples")] == [0, 2, 4]


def test_model_card_and_tokenizer_files(lora_run, tmp_path):
    sd, run = lora_run
    card = (run / "final" / "README.md").read_text()
    assert f"base_model: {sd}" in card and "| method | dpo |" in card and "| beta | 5000 |" in card
    assert "| updates | 4 |" in card and "load_lora_weights" in card and "pickapic" in card
    (run / "eval.json").write_text(json.dumps({"pickscore": 21.5}))
    export.write_model_card(run)
    assert '"pickscore": 21.5' in (run / "final" / "README.md").read_text()
    # save_merged_pipeline: the adapter in final/, the merged pipeline (with the SD-1.5 release's
    # tokenizer files) in final/merged/, which plain diffusers loads
    from diffusers import StableDiffusionPipeline
    cfg = config.resolve({"config": "sd15_pickapic", "model_path": sd, "data_path": "unused", "lora_rank": 4,
                          "save_merged_pipeline": True, "out_dir": str(tmp_path)})
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict(cfg)))
    final = export.write_final(cfg, models.build_model("sd15", sd, lora_rank=4), tmp_path, 4)
    assert (final / export.LORA_FILE).is_file() and (final / "README.md").is_file()
    names = set(os.listdir(final / "merged" / "tokenizer"))
    assert {"vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"} <= names
    StableDiffusionPipeline.from_pretrained(final / "merged", safety_checker=None)


def test_animatediff_lora_loads_in_animatediff_pipeline(tmp_path):
    from diffusers import AnimateDiffPipeline, MotionAdapter
    sd = sd15.write_tiny(str(tmp_path / "sd15"))
    adapter = animatediff.write_tiny_motion_adapter(str(tmp_path / "motion"))
    bundle = models.build_model("animatediff", sd, lora_rank=4, motion_adapter_path=adapter, num_frames=3)
    with torch.no_grad():  # gaussian init leaves lora_B = 0: give the adapter an effect
        for p in bundle.trainable_parameters():
            p.normal_(0, 0.3)
    weights = bundle.trainable_state_dict()
    assert any("motion_modules" in k for k in weights)
    export.save_lora(weights, tmp_path / "lora", "animatediff")
    pipe = AnimateDiffPipeline.from_pretrained(sd, motion_adapter=MotionAdapter.from_pretrained(adapter))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a cat walking", num_frames=3, num_inference_steps=2, output_type="np")
    base = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    pipe.load_lora_weights(str(tmp_path / "lora"))
    lora = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    assert np.abs(np.asarray(base) - np.asarray(lora)).mean() > 1e-3
    loaded = {n for n, _ in pipe.unet.named_parameters() if "lora_A" in n and "motion_modules" in n}
    assert loaded, "the motion modules' LoRA layers were not loaded"


# ----------------------------------------------------------------------------- config, schedules, resume

def test_diffusers_flag_aliases():
    cfg = config.resolve(argv=[
        "--pretrained_model_name_or_path=/m", "--output_dir", "/o", "--train_batch_size=3",
        "--gradient_accumulation_steps=5", "--learning_rate=2e-5", "--max_train_steps=7", "--checkpointing_steps=4",
        "--resume_from_checkpoint=latest", "--report_to=none", "--mixed_precision=bf16", "--seed=9",
        "--lr_scheduler=cosine", "--lr_warmup_steps=2", "--validation_prompt=a|b"])
    got = (cfg.model_path, cfg.out_dir, cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.max_steps, cfg.save_every,
           cfg.resume, cfg.resume_from_checkpoint, cfg.mixed_precision, cfg.seed, cfg.lr_scheduler, cfg.warmup_steps)
    assert got == ("/m", "/o", 3, 5, 2e-5, 7, 4, True, "latest", "bf16", 9, "cosine", 2)
    assert runtime.sample_prompts(cfg, 10) == ["a", "b"]
    assert "--learning_rate = --lr" in config.help_text()
    with pytest.raises(ValueError, match="'lr_scheduler' must be one of"):
        config.resolve(argv=["--lr_scheduler=polynomial"])


def test_missing_tracker_package_is_one_clear_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="report_to=wandb needs the wandb package: pip install wandb"):
        config.resolve(argv=["--report_to=wandb"])


def _wandb_records(path: Path):
    """The records of a wandb transaction log (run-ID.wandb), parsed with wandb's own protobuf
    schema. wandb 0.31 ships no Python reader (its Go core writes the file): LevelDB's log framing,
    32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type: 1 full, 2 first,
    3 middle, 4 last), after a 7-byte file header (':W&B', 0xBEE1, version 0)."""
    import struct
    from wandb.proto import wandb_internal_pb2
    data, block = path.read_bytes(), 32768
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), "not a wandb transaction log"
    pos, payload = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def test_wandb_offline_run_holds_every_scalar_and_the_sample_grids(cache, tmp_path, monkeypatch):
    """report_to=wandb with WANDB_MODE=offline (no account, no network), read back from the run's
    own files: every metrics.jsonl value at its step, the sample grids as images, the config."""
    wandb = pytest.importorskip("wandb", reason="report_to=wandb needs the wandb package: pip install wandb")
    from PIL import Image
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))  # nothing written under ~
    out = train.run({**FAST, "cache_dir": cache, "method": "dpo_cm", "sample_every": 2, "num_sample_prompts": 2,
                     "report_to": "wandb", "tracker_project_name": "proj", "out_dir": str(tmp_path / "run")})
    wandb.teardown()  # what process exit does: wait for wandb's service to write the whole log
    [run_dir] = (out / "wandb").glob("offline-run-*")
    [log] = run_dir.glob("run-*.wandb")
    history, config_items, project = {}, {}, None
    for r in _wandb_records(log):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            project = r.run.project
            config_items.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    config_items.pop("_wandb", None)  # wandb's own bookkeeping
    assert project == "proj" and config_items == json.loads((out / "config.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "implicit_acc", "lr", "grad_norm", "samples_per_sec", "mask_rate", "mean_weight",
            "clip_rate"} <= rows[0].keys()
    for row in rows:
        logged = history[row["step"]]
        for k, v in row.items():
            if k not in ("step", "time"):
                assert logged[f"train/{k}"] == pytest.approx(v), (row["step"], k)
    grids = sorted(step for step, h in history.items() if h.get("validation/samples/_type") == "image-file")
    assert grids == [0, 2, 4]
    for step in grids:  # the same pixels as the run's own samples/step_N.png
        media = run_dir / "files" / history[step]["validation/samples/path"]
        ours = Image.open(out / "samples" / f"step_{step:06d}.png").convert("RGB")
        assert np.array_equal(np.asarray(Image.open(media).convert("RGB")), np.asarray(ours))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    train.run({**FAST, "cache_dir": str(d), "method": "sft", "max_steps": 1,
               "out_dir": str(tmp_path_factory.mktemp("warm"))})
    return str(d)


def test_cosine_schedule_and_resume_from_a_chosen_checkpoint(cache, tmp_path, capsys):
    from diffusers.optimization import get_scheduler
    args = {**FAST, "cache_dir": cache, "method": "sspo", "max_steps": 4, "save_every": 1, "lr_scheduler": "cosine",
            "warmup_steps": 2}
    out = train.run({**args, "out_dir": str(tmp_path / "a")})
    text = capsys.readouterr().out  # not a terminal: a progress line per log step, with rate and ETA
    assert "step 4/4" in text and "samples/s" in text and "ETA" in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=FAST["lr"])
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=4)
    expected = []
    for _ in range(4):
        expected.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert [r["lr"] for r in rows] == pytest.approx(expected) and expected[0] == 0.0
    # resume a copy from step 2 (not the latest, 4): the same weights as the uninterrupted run
    shutil.copytree(out, tmp_path / "b")
    resumed = train.run({**args, "out_dir": str(tmp_path / "b"), "resume_from_checkpoint": "step_000002"})
    assert "resumed from step 2" in capsys.readouterr().out
    rows_b = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]  # rows after step 2 dropped, then logged again
    assert [r["lr"] for r in rows_b[2:]] == pytest.approx(expected[2:])
    a = load_file(str(out / "checkpoints" / "step_000004" / "trainable.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_000004" / "trainable.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match=r"no such checkpoint .*have: step_000001, step_000002"):
        train.run({**args, "out_dir": str(tmp_path / "b"), "resume_from_checkpoint": "step_000009"})
    with pytest.raises(ValueError, match="max_steps: 4 -> 6"):  # cosine decays to 0 at max_steps
        train.run({**args, "out_dir": str(tmp_path / "b"), "max_steps": 6, "resume": True})


def test_validation_prompts_and_grid(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\nthree\n")
    cfg = config.resolve({"validation_prompts": str(tmp_path / "p.txt")})
    assert runtime.sample_prompts(cfg, 2) == ["one", "two"]
    grid = runtime._grid(torch.zeros(7, 3, 4, 6))
    assert grid.size == (5 * 6, 2 * 4)  # make_image_grid, 5 columns, the last row padded


def test_validation_prompts_and_steps_reach_the_sample_grids(cache, tmp_path, monkeypatch):
    """--validation_prompt / --validation_steps (the diffusers scripts' names) choose what the
    grids show and when: the sampler gets those prompts at steps 0, 2, 4, one cell each."""
    from models import sampling
    from PIL import Image
    seen, grid_steps, real_sample, real_grid = [], [], sampling.sample_with_policy, runtime.save_samples

    def sample(bundle, prompts, **kw):  # the sampler, as called for a grid (not for digits' data)
        if grid_steps:
            seen.append(list(prompts))
        return real_sample(bundle, prompts, **kw)

    def save_samples(cfg, bundle, out, step, *a, **kw):
        grid_steps.append(step)
        try:
            return real_grid(cfg, bundle, out, step, *a, **kw)
        finally:
            grid_steps.pop()

    monkeypatch.setattr(sampling, "sample_with_policy", sample)
    monkeypatch.setattr(runtime, "save_samples", save_samples)
    prompts = ["a photo of the digit 3", "a photo of the digit 7", "a photo of the digit 0"]
    argv = [f"--{k}={v}" for k, v in {**FAST, "sample_every": 0}.items()]
    argv += [f"--cache_dir={cache}", "--method=sft", f"--out_dir={tmp_path / 'run'}",
             f"--validation_prompt={'|'.join(prompts)}", "--validation_steps=2"]
    train.run(argv=argv)  # (train.main would also run the digits judge: slow, and not the point here)
    assert seen == [prompts] * 3
    grids = sorted((tmp_path / "run" / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_000000.png", "step_000002.png", "step_000004.png"]
    with Image.open(grids[0]) as im:
        assert im.width == 3 * im.height  # one row of three square cells


def test_progress_lines_when_stdout_is_not_a_terminal(tmp_path):
    """Piped (a batch job's log file): a line per log step with loss, rate and ETA on stdout, and
    no tqdm bar anywhere. The tiny SD-1.5 stand-in (the digits default would also run its judge)."""
    sd = sd15.write_tiny(str(tmp_path / "sd15"))
    _write_pickapic(tmp_path / "pickapic")
    argv = ["--config=sd15_pickapic", f"--model_path={sd}", f"--data_path={tmp_path / 'pickapic'}", "--method=dpo",
            "--lora_rank=4", "--max_steps=3", "--resolution=16", "--grad_accum=1", "--warmup_steps=0",
            "--num_workers=0", "--log_every=1", "--checkpointing_steps=3", "--sample_every=0",
            "--num_sample_prompts=1", "--mixed_precision=no", f"--out_dir={tmp_path / 'run'}"]
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], capture_output=True, text=True,
                       timeout=HANG_GUARD_S, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    line = re.compile(r"^step (\d+)/3 \| loss [\d.]+ \| acc [\d.]+ \| margin \S+ \| lr \S+ \| [\d.]+ s/step "
                      r"\| [\d.]+ samples/s \| ETA \d+m\d\ds$")
    steps = [int(m.group(1)) for m in map(line.match, r.stdout.splitlines()) if m]
    assert steps == [1, 2, 3], r.stdout
    assert "it/s" not in r.stderr and "\r" not in r.stderr + r.stdout
