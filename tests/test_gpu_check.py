"""research/gpu_check.py: its dry run with the lazily imported packages blocked, rows that fail
soft, the time budget, the placeholder tables; and what only a CUDA GPU can check (marked
``cuda``, skipped without one; ``pytest -m cuda`` runs them): bf16 autocast against float32,
the fp16 GradScaler path, the sampler against the pipeline under bf16, channels-last and the
attention kernel."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S
import torch

from research import gpu_check

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("av", "sklearn", "matplotlib", "tensorboard", "wandb", "pyarrow")

# Runs in a fresh interpreter: every BLOCKED package set to None in sys.modules (an import of it
# raises), and every import of one asked for by the repository's own code recorded, so that an
# import caught by a try/except in the project still fails the test. Libraries probing for
# optional packages are not the project's doing and are not recorded.
PROBE = r"""
import builtins, importlib, json, os, runpy, sys
root, out, blocked = sys.argv[1], sys.argv[2], set(json.loads(sys.argv[3]))
for name in blocked:
    sys.modules[name] = None
tried = []
def ours(g):
    f = (g or {}).get("__file__") or ""
    return f.startswith(root) and os.sep + "venv" not in f[len(root):]
real_import, real_import_module = builtins.__import__, importlib.import_module
def spy(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.split(".")[0] in blocked and ours(globals):
        tried.append(name + " <- " + globals.get("__name__", "?"))
    return real_import(name, globals, locals, fromlist, level)
def spy_module(name, package=None):
    caller = sys._getframe(1).f_globals
    if name.split(".")[0] in blocked and ours(caller):
        tried.append(name + " <- " + caller.get("__name__", "?"))
    return real_import_module(name, package)
builtins.__import__, importlib.import_module = spy, spy_module
sys.argv = ["research.gpu_check", "--dry-run", "--out", out]
try:
    runpy.run_module("research.gpu_check", run_name="__main__", alter_sys=True)
finally:
    print("TRIED " + json.dumps(tried), flush=True)
    print("LOADED " + json.dumps(sorted(n for n in blocked if sys.modules.get(n) is not None)), flush=True)
"""


@pytest.mark.slow
def test_dry_run_writes_every_row_without_the_blocked_packages(tmp_path):
    r = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), str(tmp_path), json.dumps(BLOCKED)],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.splitlines()
    tried = json.loads(next(line for line in lines if line.startswith("TRIED "))[6:])
    loaded = json.loads(next(line for line in lines if line.startswith("LOADED "))[7:])
    assert tried == [] and loaded == [], (tried, loaded)
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["tiny"] and res["command"] == f"python -m research.gpu_check --dry-run --out {tmp_path}"
    rows = res["rows"]
    assert set(rows) == {"sd15/sft", "sd15/dpo", "sd15/sspo", "sweep", "sdxl", "cogvideox", "wan"}
    assert {k: r["status"] for k, r in rows.items()} == {k: "ok" for k in rows}
    assert {k: v["status"] for k, v in rows["sweep"]["settings"].items()} == \
        {f"steps{s}_pairs{p}": "ok" for s, p in gpu_check.SWEEP}
    for key in ("sd15/sft", "sd15/dpo", "sd15/sspo", "sdxl", "cogvideox", "wan"):
        assert rows[key]["s_median"] > 0 and rows[key]["n"] >= 1
    assert rows["sd15/dpo"]["micro_steps"] == 2 and rows["cogvideox"]["latents"] == [16, 3, 4, 4]
    assert res["ratios"]["time"] > 0 and set(res["predicted_ratio"]) == set(rows["sweep"]["settings"])
    md = (tmp_path / "gpu.md").read_text()
    assert gpu_check.NOT_YET not in md and "| Diffusion-DPO |" in md


def test_plan_only_marks_every_measured_cell_not_measured_yet(tmp_path):
    assert gpu_check.main(["--plan-only", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "gpu.md").read_text()
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["rows"] == {} and res["machine"]["device"] == "none (plan only)"
    # 3 SD-1.5 rows, 5 sweep settings, 3 models: each says so in its status column
    status = [line.rstrip(" |").rsplit("|", 1)[-1].strip() for line in md.splitlines()
              if line.startswith("| ") and line.count("|") >= 7 and not line.startswith(("| method", "| steps", "| model"))]
    assert status == [gpu_check.NOT_YET] * 11, status
    # the plans are there before any GPU: SDXL LoRA r=8 from research/memory_sdxl.py (7.4 GB: bf16 frozen modules)
    assert res["plans"]["sdxl"]["total_gb"] == pytest.approx(7.4, abs=0.05)
    assert res["plans"]["cogvideox"]["activations_gb"] > 0 and res["plans"]["wan"]["comparable_gb"] > 0


def test_rows_fail_soft_and_the_budget_stops_cleanly(monkeypatch):
    device, rows, budget = torch.device("cpu"), {}, gpu_check.Budget(100.0)

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def missing():
        import importlib
        importlib.import_module("a_package_nobody_installs")

    gpu_check.attempt(rows, "a", oom, budget, 0, device, log=lambda s: None)
    gpu_check.attempt(rows, "b", missing, budget, 0, device, log=lambda s: None)
    gpu_check.attempt(rows, "c", lambda: 1 / 0, budget, 0, device, log=lambda s: None)
    gpu_check.attempt(rows, "d", lambda: {"x": 1}, budget, 0, device, log=lambda s: None)
    gpu_check.attempt(rows, "e", lambda: {"x": 1}, budget, 1000, device, log=lambda s: None)
    assert [rows[k]["status"] for k in "abcde"] == ["OOM", "needs a_package_nobody_installs",
                                                     "error: ZeroDivisionError: division by zero", "ok",
                                                     "skipped: time budget"]
    # timed calls stop at the row's cap, keeping at least one
    calls = []
    secs = gpu_check.timed(lambda: calls.append(1), device, warmup=1, repeats=50, cap_s=0.0, budget=budget,
                           log=lambda s: None)
    assert len(calls) == 2 and len(secs) == 1
    spent = gpu_check.Budget(0.0)
    secs = gpu_check.timed(lambda: calls.append(1), device, warmup=0, repeats=50, cap_s=1e9, budget=spent,
                           log=lambda s: None)
    assert len(secs) == 1


def test_spent_budget_skips_every_row_and_still_writes(tmp_path):
    assert gpu_check.main(["--dry-run", "--budget", "0", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert len(res["rows"]) == 7 and {r["status"] for r in res["rows"].values()} == {"skipped: time budget"}
    assert "skipped: time budget" in (tmp_path / "gpu.md").read_text()


# ----------------------------------------------------------------------------- CUDA only

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# bf16 keeps 8 bits of mantissa (relative rounding 2^-9), and the per-sample errors are means
# over the latent: they agree with float32 to a relative 1e-3. The loss multiplies error
# differences by beta/2 (250 here, 2500 at the presets' 5000): an error shift of 1e-4 moves it
# by ~0.05, so it is held to 0.15. The gradient keeps its direction (cosine >= 0.99) and its norm
# (within 10%). (bf16 autocast on a CPU, same model: errors 2e-4, loss 0.05, cosine 0.999, norm 3.5%.)
ERR_RTOL, LOSS_ATOL, GRAD_COS, GRAD_NORM_RTOL = 1e-3, 0.15, 0.99, 0.10
NUDGE = 5e-2  # the policy's distance from its reference, in units of each tensor's spread


def _rig(device, method: str, precision: str, beta: float = 500.0, latent: int = 32):
    import tempfile
    """Tiny-width SD-1.5 through gpu_check's Rig, batch 2, the policy nudged off its reference
    (checkpoint 0) so that the preference loss is not at its start value log 2."""
    cfg = gpu_check.preset("sd15_pickapic", mixed_precision=precision, beta=beta, batch_size=2, grad_accum=1,
                           loser_batch=2, loser_every=1, loser_steps=3, pool_storage="memory",
                           gradient_checkpointing=False)
    bundle, _ = gpu_check.build("sd15", cfg, device, tiny=True)
    rig = gpu_check.Rig(bundle, (4, latent, latent), method, cfg, device, tempfile.mkdtemp(prefix="gpu_check_test_"))
    g = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for p in bundle.trainable_parameters():
            p.add_(NUDGE * p.std().nan_to_num() * torch.randn(p.shape, generator=g, device=device))
    return rig


def _loss_and_grad(rig):
    """One micro-step as loop.update runs it: the reference checkpoint, the batch with its
    losers, ``training_step``, backward; the loss, its metrics and the flat gradient."""
    import loop
    rig.new_losers()
    rig.run.losers.begin(0)
    loss, metrics = loop.training_step(rig.run, rig.run.losers.next_batch(rig.stream, 0), 0)
    loss.backward()
    grad = torch.cat([p.grad.flatten().float() for p in rig.run.params])
    return loss.detach().float(), metrics, grad


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", ["dpo", "sspo"])
def test_bf16_update_matches_fp32(method):
    dev = torch.device("cuda")
    res = {prec: _loss_and_grad(_rig(dev, method, prec)) for prec in ("no", "bf16")}
    (l32, m32, g32), (l16, m16, g16) = res["no"], res["bf16"]
    for k in ("model_err_w", "model_err_l"):
        torch.testing.assert_close(m16[k].float(), m32[k].float(), rtol=ERR_RTOL, atol=0)
    assert abs(l16 - l32) <= LOSS_ATOL, (l16, l32)
    assert abs(l32 - torch.log(torch.tensor(2.0, device=dev))) > 0.1  # the nudge moved the loss off log 2
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) >= GRAD_COS
    assert abs(g16.norm() / g32.norm() - 1) <= GRAD_NORM_RTOL


@pytest.mark.cuda
@needs_cuda
def test_fp16_grad_scaler_steps_and_skips_a_step_on_inf():
    dev = torch.device("cuda")
    rig = _rig(dev, "dpo", "fp16")
    run = rig.run
    assert run.scaler.is_enabled()
    run.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)  # a scale this model's fp16 backward fits
    before = [p.detach().clone() for p in run.params]
    scale = run.scaler.get_scale()
    assert rig.cycle() == 1  # loop.update, stepping through the GradScaler
    assert any(not torch.equal(a, p) for a, p in zip(before, run.params))  # a step was taken
    assert run.scaler.get_scale() == scale
    # a scale large enough that the scaled fp16 backward overflows: inf gradients, step skipped, scale backed off
    run.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 100)
    before = [p.detach().clone() for p in run.params]
    assert rig.cycle() == 1
    assert all(torch.equal(a, p) for a, p in zip(before, run.params))
    assert run.scaler.get_scale() == 2.0 ** 99


# the sampler and StableDiffusionPipeline run the same UNet calls; under bf16 both round alike,
# and 3 steps of UniPC keep them within 3e-2 of each other (float32 on the CPU: 1e-4)
SAMPLER_TOL = 3e-2


@pytest.mark.cuda
@needs_cuda
def test_sampler_equals_pipeline_under_bf16():
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler
    from models import sampling
    dev = torch.device("cuda")
    rig = _rig(dev, "sspo", "bf16", latent=16)
    b = rig.run.bundle
    b.unet.eval()
    prompts = ["a red apple", "a blue car"]
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = sampling.sample(b, sampling.policy_denoiser(b), prompts, latents=z, latent_shape=(4, 16, 16),
                               num_inference_steps=3, guidance_scale=7.5, scheduler="unipc")
    sched = UniPCMultistepScheduler.from_config(dict(b.scheduler_config, steps_offset=1))
    pipe = StableDiffusionPipeline(vae=None, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = pipe(prompts, height=128, width=128, num_inference_steps=3, guidance_scale=7.5, latents=z,
                   output_type="latent").images
    torch.testing.assert_close(ours.float(), ref.float(), atol=SAMPLER_TOL, rtol=SAMPLER_TOL)


@pytest.mark.cuda
@needs_cuda
def test_channels_last_and_attention_kernel_leave_the_loss_within_bf16_tolerance():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    def loss(convert):
        rig = _rig(torch.device("cuda"), "dpo", "bf16")
        convert(rig.run.bundle.unet)
        return _loss_and_grad(rig)

    base_loss, base_m, base_g = loss(lambda u: u.set_attn_processor(AttnProcessor2_0()))  # SDPA
    for convert in (lambda u: u.to(memory_format=torch.channels_last),
                    lambda u: u.set_attn_processor(AttnProcessor())):  # attention as explicit matmuls
        l, m, g = loss(convert)
        assert abs(l - base_loss) <= LOSS_ATOL
        for k in ("model_err_w", "model_err_l"):
            torch.testing.assert_close(m[k].float(), base_m[k].float(), rtol=ERR_RTOL, atol=0)
        assert torch.nn.functional.cosine_similarity(g, base_g, dim=0) >= GRAD_COS
        assert abs(g.norm() / base_g.norm() - 1) <= GRAD_NORM_RTOL
