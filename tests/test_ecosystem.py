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
    assert "| global batch (pairs per update) | 1 x 1 accumulation x 1 process = 1 |" in card, card
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
        "--config=digits", "--pretrained_model_name_or_path=/m", "--output_dir", "/o", "--train_batch_size=3",
        "--gradient_accumulation_steps=5", "--learning_rate=2e-5", "--max_train_steps=7", "--checkpointing_steps=4",
        "--resume_from_checkpoint=latest", "--report_to=none", "--mixed_precision=bf16", "--seed=9",
        "--lr_scheduler=cosine", "--lr_warmup_steps=2", "--validation_prompt=a|b"])
    got = (cfg.model_path, cfg.out_dir, cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.max_steps, cfg.save_every,
           cfg.resume, cfg.resume_from_checkpoint, cfg.mixed_precision, cfg.seed, cfg.lr_scheduler, cfg.warmup_steps)
    assert got == ("/m", "/o", 3, 5, 2e-5, 7, 4, True, "latest", "bf16", 9, "cosine", 2)
    assert runtime.sample_prompts(cfg, 10) == ["a", "b"]
    assert "--learning_rate = --lr" in config.help_text()
    assert config.resolve(argv=["--config=sd15_pickapic", "--dataset_name=/snap"]).data_path == "/snap"
    with pytest.raises(ValueError, match="'lr_scheduler' must be one of"):
        config.resolve(argv=["--lr_scheduler=exponential"])


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
        assert im.size == (3 * 96, 64 + 40)  # one row of three 64 px cells, each above its prompt (96 px wide)


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


# ----------------------------------------------------------------------------- a diffusers user's command line

def _cli(*argv, timeout=HANG_GUARD_S):
    """``python train.py ARGV`` as a user runs it: a subprocess, stdout and stderr piped."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _errors(r) -> list[str]:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


# small, fast settings on top of whichever preset a run starts from
SMALL = ["--max_steps=2", "--resolution=16", "--grad_accum=1", "--warmup_steps=0", "--num_workers=0",
         "--sample_every=0", "--num_sample_prompts=1", "--mixed_precision=no", "--batch_size=1", "--log_every=1",
         "--gradient_checkpointing=false"]


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    sd = sd15.write_tiny(str(tmp / "sd15"))
    _write_pickapic(tmp / "pickapic")
    return sd, tmp / "pickapic"


@pytest.fixture(scope="module")
def cli_run(tiny_sd15, tmp_path_factory):
    """The diffusers DPO script's flags, no --config: a LoRA DPO run on the tiny SD-1.5 stand-in."""
    sd, pick = tiny_sd15
    out = tmp_path_factory.mktemp("cli_run") / "run"
    r = _cli(f"--pretrained_model_name_or_path={sd}", f"--train_data_dir={pick}", "--method=dpo", "--rank=4",
             "--beta_dpo=2500", "--checkpointing_steps=1", "--learning_rate=1e-2", *SMALL, f"--output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return r, out


def test_family_and_preset_are_inferred_from_model_index(cli_run, tiny_sd15, tmp_path):
    """No --config with an SD-1.5 directory: the sd15 preset (one line says so), not digits'; a
    directory that names no pipeline is refused in one line."""
    r, out = cli_run
    assert "starting from preset sd15_pickapic" in r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model"], cfg["data"], cfg["loser_guidance"]) == ("sd15", "pickapic", 7.5)
    (tmp_path / "empty").mkdir()
    bad = _cli(f"--pretrained_model_name_or_path={tmp_path / 'empty'}", f"--train_data_dir={tiny_sd15[1]}",
               f"--output_dir={tmp_path / 'run'}")
    assert bad.returncode == 2
    [line] = _errors(bad)
    assert "cannot infer the model family" in line and "--model=" in line and "--config=" in line
    # --model=sd15 without a preset: the sd15 preset too
    cfg = config.resolve(argv=["--model=sd15", f"--data_path={tiny_sd15[1]}"])
    assert (cfg.beta, cfg.out_dir, cfg.loser_guidance) == (5000.0, "runs/sd15_pickapic", 7.5)


def test_beta_dpo_means_what_it_means_in_diffusers(cli_run):
    """diffusers: -logsigmoid(beta_dpo * (...)); here -logsigmoid(-beta/2 * (...)): beta = 2 beta_dpo."""
    _, out = cli_run
    assert json.loads((out / "config.json").read_text())["beta"] == 5000.0
    assert config.resolve(argv=["--beta_dpo=100"]).beta == 200.0
    with pytest.raises(ValueError, match="--beta_dpo expects a number"):
        config.resolve(argv=["--beta_dpo=high"])


def test_every_lora_checkpoint_loads_in_plain_diffusers(cli_run, tiny_sd15):
    _, out = cli_run
    step = out / "checkpoints" / "step_000001"
    assert (step / export.LORA_FILE).is_file()
    r = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, tiny_sd15[0], str(step)], capture_output=True,
                       text=True, timeout=HANG_GUARD_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.split("DIFF")[-1]) > 1e-4


def test_resume_from_checkpoint_in_every_spelling(cli_run, tiny_sd15, tmp_path):
    """step_000002, step_2, checkpoint-2 (diffusers), 2, or a path: all resume from step 2."""
    _, out = cli_run
    sd, pick = tiny_sd15
    for which in ("step_2", "checkpoint-2", "2", str(out / "checkpoints" / "step_000002")):
        run = tmp_path / which.replace("/", "_")
        shutil.copytree(out, run)
        r = _cli(f"--pretrained_model_name_or_path={sd}", f"--train_data_dir={pick}", "--method=dpo", "--rank=4",
                 "--beta_dpo=2500", "--learning_rate=1e-2", *SMALL, f"--output_dir={run}",
                 f"--resume_from_checkpoint={which}")
        assert r.returncode == 0, (which, r.stderr[-3000:])
        assert "resumed from step 2" in r.stdout, which
    r = _cli(f"--pretrained_model_name_or_path={sd}", f"--train_data_dir={pick}", "--method=dpo", "--rank=4",
             "--beta_dpo=2500", "--learning_rate=1e-2", *SMALL, f"--output_dir={run}", "--resume_from_checkpoint=step_9")
    assert r.returncode == 2 and "checkpoint-N" in _errors(r)[0]


def test_saving_does_not_change_the_replay_interval(tiny_sd15, tmp_path):
    """--checkpointing_steps is saving only: the pool grows every replay_every (K), and saving need
    not be a multiple of loser_every."""
    sd, pick = tiny_sd15
    base = [f"--pretrained_model_name_or_path={sd}", f"--train_data_dir={pick}", "--method=sspo", "--rank=4",
            "--loser_steps=2", "--loser_batch=0", "--learning_rate=1e-2", *SMALL]
    a = _cli(*base, "--checkpointing_steps=1", "--loser_every=2", "--replay_every=2", f"--output_dir={tmp_path / 'a'}")
    assert a.returncode == 0, a.stderr[-3000:]
    b = _cli(*base, "--checkpointing_steps=2", "--loser_every=2", "--replay_every=2", f"--output_dir={tmp_path / 'b'}")
    assert b.returncode == 0, b.stderr[-3000:]
    wa = load_file(str(tmp_path / "a" / "checkpoints" / "step_000002" / "trainable.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoints" / "step_000002" / "trainable.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # saving every update changed nothing
    cfg = config.resolve(argv=["--config=sd15_pickapic", "--data_path=x", "--checkpointing_steps=50"])
    assert (cfg.save_every, config.replay_interval(cfg)) == (50, 200)  # the preset keeps its K
    r = _cli(*base, "--loser_every=2", "--replay_every=3", f"--output_dir={tmp_path / 'c'}")
    assert r.returncode == 2 and "'replay_every' (3) must be a multiple of 'loser_every' (2)" in _errors(r)[0]


def test_a_missing_validation_prompts_file_is_an_error(tmp_path):
    r = _cli("--validation_prompts=promts.txt", f"--out_dir={tmp_path / 'run'}")
    assert r.returncode == 2
    [line] = _errors(r)
    assert "'promts.txt' looks like a file but does not exist" in line
    assert config.resolve(argv=["--validation_prompts=a cat|a dog"]).validation_prompts == "a cat|a dog"
    assert config.resolve(argv=["--validation_prompts=a photo of a 1/2 cat"])  # prompt text with a slash


def test_full_fine_tune_checkpoint_exports_like_final(tiny_sd15, tmp_path):
    """A full fine-tune's checkpoints/step_N exports to the layout of final/, which plain diffusers loads."""
    from diffusers import StableDiffusionPipeline
    sd, pick = tiny_sd15
    r = _cli(f"--pretrained_model_name_or_path={sd}", f"--train_data_dir={pick}", "--method=sft",
             "--learning_rate=1e-2", "--checkpointing_steps=1", *SMALL, f"--output_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    for step in (1, 2):
        export.export_checkpoint(run / "checkpoints" / f"step_{step:06d}", tmp_path / f"exp{step}")
    kw = dict(safety_checker=None, requires_safety_checker=False, local_files_only=True)
    final = StableDiffusionPipeline.from_pretrained(run / "final", **kw).unet.state_dict()
    two = StableDiffusionPipeline.from_pretrained(tmp_path / "exp2", **kw).unet.state_dict()
    one = StableDiffusionPipeline.from_pretrained(tmp_path / "exp1", **kw).unet.state_dict()
    assert all(torch.equal(final[k], two[k]) for k in final)
    assert any(not torch.equal(final[k], one[k]) for k in final)


def test_main_job_ends_with_a_labelled_base_vs_aligned_picture(cache, tmp_path):
    """python train.py (small): the last line names one picture, base above and aligned below, a
    column per prompted digit; the periodic grids write each prompt under its image."""
    from PIL import Image
    out = tmp_path / "run"
    r = _cli(*[f"--{k}={v}" for k, v in FAST.items() if k != "sample_every"], "--sample_every=2",
             "--num_sample_prompts=3", f"--cache_dir={cache}", "--method=sft", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"picture: {out / evaluate.PICTURE}"), last
    with Image.open(out / evaluate.PICTURE) as im:
        assert im.width >= 10 * 40 and im.height >= 2 * 3 * 40  # 10 digits x (base, aligned) x 3 samples
    with Image.open(out / "samples" / "step_000002.png") as im:
        a = np.asarray(im.convert("L"), dtype=float)
    band = a[64:]  # under the 64 px cells: the prompts, black on white
    assert band.min() < 100 and (band > 200).mean() > 0.5
    cells = [band[:, 96 * i:96 * (i + 1)] for i in range(3)]  # three prompts, three different texts
    assert not np.array_equal(cells[0], cells[1]) and not np.array_equal(cells[1], cells[2])


def test_tensorboard_resume_purges_and_a_refused_resume_writes_nothing(tiny_sd15, tmp_path):
    """A refused resume leaves no event file; a resumed run's points replace the earlier run's from
    the resume step on (purge_step); the loss is also under `loss`, the diffusers DPO script's tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    sd, pick = tiny_sd15
    out = tmp_path / "run"
    base = [f"--pretrained_model_name_or_path={sd}", f"--train_data_dir={pick}", "--method=dpo", "--rank=4",
            "--checkpointing_steps=1", *SMALL, "--report_to=tensorboard", f"--output_dir={out}"]
    r = _cli(*base, "--learning_rate=1e-2")
    assert r.returncode == 0, r.stderr[-3000:]
    events = sorted((out / "logs").glob("events.out.tfevents.*"))
    refused = _cli(*base, "--learning_rate=5e-2", "--resume_from_checkpoint=1")
    assert refused.returncode == 2 and sorted((out / "logs").glob("events.out.tfevents.*")) == events
    resumed = _cli(*base, "--learning_rate=1e-2", "--resume_from_checkpoint=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    acc = EventAccumulator(str(out / "logs"), size_guidance={"scalars": 0})  # as the tensorboard UI reads
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def test_settings_diffusers_users_reach_for(tiny_sd15, tmp_path):
    """--num_train_epochs (converted to updates), every get_scheduler choice, --adam_epsilon,
    --allow_tf32; --use_8bit_adam without bitsandbytes is one line and exit 2."""
    import importlib.util
    sd, pick = tiny_sd15
    out = tmp_path / "run"
    small = [a for a in SMALL if not a.startswith(("--max_steps", "--batch_size"))]
    r = _cli(f"--pretrained_model_name_or_path={sd}", f"--train_data_dir={pick}", "--method=dpo", "--rank=4",
             "--train_batch_size=8", "--num_train_epochs=1", "--lr_scheduler=polynomial", "--adam_epsilon=1e-6",
             "--allow_tf32", *small, f"--output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["max_steps"], cfg["lr_scheduler"], cfg["adam_epsilon"]) == (2, "polynomial", 1e-6)  # 16 pairs / 8
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    from diffusers.optimization import SchedulerType
    assert set(config.CHOICES["lr_scheduler"]) == {s.value for s in SchedulerType}
    if importlib.util.find_spec("bitsandbytes") is None:
        r = _cli("--use_8bit_adam", f"--out_dir={tmp_path / 'b'}")
        assert r.returncode == 2 and "needs the bitsandbytes package" in _errors(r)[0]


def test_digits_base_build_prints_progress_when_piped(tmp_path):
    """The first command's base build, piped (CI, nohup): progress lines, no silent minutes."""
    code = f"import digits; digits.ensure_base({str(tmp_path)!r}, 20, 0.65)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("digits base, stage")]
    assert len(lines) == 20 and lines[-1].startswith("digits base, stage 2: 10/10 updates")
    assert "\r" not in r.stderr


def test_use_ema_is_diffusers_emamodel_in_checkpoints_and_final(tiny_sd15, tmp_path):
    """--use_ema: final/ holds diffusers' EMAModel average of the updates' weights (its warm-up:
    decay 0 after update 1, 1/(10+1) ... min(decay, (1+n)/(10+n)) after update n+1); the average
    is in every checkpoint, so a resumed run ends with the same final/."""
    sd, pick = tiny_sd15
    args = [f"--pretrained_model_name_or_path={sd}", f"--train_data_dir={pick}", "--method=dpo", "--rank=4",
            "--checkpointing_steps=1", "--learning_rate=1e-2", "--use_ema", "--ema_decay=0.5", *SMALL]
    r = _cli(*args, f"--output_dir={tmp_path / 'a'}")
    assert r.returncode == 0, r.stderr[-3000:]
    a = tmp_path / "a"
    w1, w2 = (export.lora_layers(load_file(str(a / "checkpoints" / f"step_00000{i}" / "trainable.safetensors")))
              for i in (1, 2))
    final = load_file(str(a / "final" / export.LORA_FILE))
    d = min(0.5, 2 / 11)  # EMAModel.get_decay at its second update
    for k in w1:
        assert torch.allclose(final[f"unet.{k}"], d * w1[k] + (1 - d) * w2[k], atol=1e-6), k
    assert any(not torch.equal(final[f"unet.{k}"], w2[k]) for k in w2)
    shutil.copytree(a, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000002")
    r = _cli(*args, f"--output_dir={tmp_path / 'b'}", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    again = load_file(str(tmp_path / "b" / "final" / export.LORA_FILE))
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_model_card_holds_the_last_sample_grid(lora_run):
    _, run = lora_run
    from diffusers.utils.hub_utils import load_or_create_model_card
    export.write_model_card(run)
    card = (run / "final" / "README.md").read_text()
    assert "![samples at step_000004](samples.png)" in card and (run / "final" / "samples.png").is_file()
    assert load_or_create_model_card(str(run / "final" / "README.md")).data.library_name == "diffusers"


def test_snr_gamma_on_the_command_line(cache, tmp_path):
    """diffusers' `--snr_gamma 5` (space-separated) is taken by the digits preset and recorded in
    config.json; a flow-matching family refuses it in one line."""
    out = tmp_path / "run"
    r = _cli("--config=digits", "--snr_gamma", "5", *[f"--{k}={v}" for k, v in FAST.items() if k != "max_steps"],
             "--max_steps=1", f"--cache_dir={cache}", "--method=sft", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["snr_gamma"] == 5.0
    with pytest.raises(ValueError, match="model 'wan' trains with flow matching: drop --snr_gamma"):
        config.resolve(argv=["--config=wan21_sdpo", "--data_path=/v", "--snr_gamma=5"])


def test_model_card_global_batch_follows_the_world_size_of_each_start(tmp_path):
    """processes.json: a row per (re)start that changes the world size; a resume drops the rows
    after its checkpoint; the card gives the global batch of each; a run without the file says so."""
    cfg = config.to_dict(config.resolve({"batch_size": 4, "grad_accum": 2, "method": "sft"}))
    export.record_processes(tmp_path, 0, 8)
    export.record_processes(tmp_path, 6, 8)   # resumed on as many processes: no new row
    export.record_processes(tmp_path, 10, 2)  # resumed on 2
    rows = json.loads((tmp_path / export.PROCESSES_FILE).read_text())
    assert rows == [{"step": 0, "world_size": 8}, {"step": 10, "world_size": 2}]
    card = export.model_card(cfg, 20, processes=rows)
    assert ("| global batch (samples per update) | 4 x 2 accumulation x 8 processes = 64 from update 1, "
            "4 x 2 accumulation x 2 processes = 16 from update 11 |") in card, card
    export.record_processes(tmp_path, 4, 1)   # resumed from an earlier checkpoint: later rows dropped
    assert json.loads((tmp_path / export.PROCESSES_FILE).read_text()) == [{"step": 0, "world_size": 8},
                                                                         {"step": 4, "world_size": 1}]
    export.record_processes(tmp_path, 0, 1)   # a fresh start forgets the old run
    assert json.loads((tmp_path / export.PROCESSES_FILE).read_text()) == [{"step": 0, "world_size": 1}]
    assert "4 x 2 accumulation x (process count not recorded)" in export.model_card(cfg, 20)


@pytest.mark.parametrize("method,lora", [("sspo", 4), ("dpo", 0)])
def test_frozen_modules_in_the_autocast_dtype_trainable_weights_float32(tiny_sd15, tmp_path, monkeypatch, method, lora):
    """mixed_precision=bf16 (CPU autocast): the text encoder, the VAE, LoRA's frozen base UNet and a
    full fine-tune's reference copy are held in bf16, as diffusers' scripts hold them in
    weight_dtype; the trained weights (and so the snapshots and final/'s adapter) stay float32,
    and a saved pipeline's frozen modules are the base's own files, not their bf16 copies. The run
    goes end to end: loser sampling, the sample grid, final/."""
    import loop
    sd, pick = tiny_sd15
    seen = {}
    real_setup = loop.setup
    monkeypatch.setattr(loop, "setup", lambda *a, **k: seen.setdefault("run", real_setup(*a, **k)))
    out = tmp_path / "run"
    assert train.main(["--config=sd15_pickapic", f"--model_path={sd}", f"--data_path={pick}", f"--method={method}",
                       f"--lora_rank={lora}", *SMALL[:-4], "--mixed_precision=bf16", "--log_every=1",
                       "--loser_steps=2", f"--out_dir={out}"]) == 0
    run = seen["run"]
    bf16 = torch.bfloat16
    assert {p.dtype for p in run.bundle.text_encoder.parameters()} == {bf16}
    assert {p.dtype for p in run.bundle.vae.parameters()} == {bf16}
    assert run.params and {p.dtype for p in run.params} == {torch.float32}
    frozen = {p.dtype for n, p in run.bundle.unet.named_parameters() if not run.bundle.is_trainable(n)}
    assert frozen == ({bf16} if lora else set())  # LoRA: the base and the "ref" adapter; full: none
    if not lora:
        assert {p.dtype for p in run.reference.unet.parameters()} == {bf16}
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    weights = load_file(str(out / "final" / (export.LORA_FILE if lora else "unet/diffusion_pytorch_model.safetensors")))
    assert {v.dtype for v in weights.values()} == {torch.float32}
    if not lora:  # the saved pipeline's frozen modules are the base's files, not their bf16 copies
        for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
            saved, base = load_file(str(out / "final" / part)), load_file(str(Path(sd) / part))
            assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base), part


@pytest.mark.parametrize("family", ["sdxl", "wan"])
def test_the_sdxl_and_wan_vaes_stay_float32_under_mixed_precision(tmp_path, family):
    """SDXL's VAE overflows in fp16: diffusers' SDXL scripts keep it in float32, and so does
    cast_frozen; Wan's too (diffusers' Wan documentation loads it in float32), and it encodes and
    decodes in float32 under the run's autocast."""
    import importlib
    fam = importlib.import_module(f"models.{family}")
    bundle = models.build_model(family, fam.write_tiny(str(tmp_path / family)))
    models.cast_frozen(bundle, torch.bfloat16)
    assert {p.dtype for p in bundle.vae.parameters()} == {torch.float32}
    encoders = [m for m in (bundle.text_encoder, bundle.text_encoder_2) if m is not None]
    assert {p.dtype for m in encoders for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bundle.unet.parameters()} == {torch.float32}  # full fine-tuning: all of it trains
    if family == "wan":
        x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = models.encode_pixels(bundle, x, torch.Generator().manual_seed(0))
            y = models.decode_latents(bundle, z)
        assert z.dtype == torch.float32 and y.dtype == torch.float32
