"""SDXL (models/sdxl.py) on a tiny random-weight stand-in in the real layout: time_ids from each
image's real size and crop, the sampler against StableDiffusionXLPipeline, the saved output in
plain diffusers (fresh process), and every method through train.run (1 process; 2 + resume)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import models
from models import sampling
import train
from models import sdxl
from conftest import HANG_GUARD_S
from test_train import _torchrun, _weights, _write_pickapic

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(model="sdxl", data="pickapic", max_steps=2, batch_size=2, save_every=1, loser_steps=2,
           resolution=16, log_every=1, sample_every=0, num_sample_prompts=2, lr=1e-3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return sdxl.write_tiny(str(tmp_path_factory.mktemp("sdxl") / "tiny"))


@pytest.fixture(scope="module")
def pipe(tiny):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    p = StableDiffusionXLPipeline.from_pretrained(tiny)
    p.scheduler = DDIMScheduler.from_config(p.scheduler.config)  # the project's sampler is DDIM
    p.set_progress_bar_config(disable=True)
    return p


def _find_crop(big: np.ndarray, crop: np.ndarray) -> tuple[int, int]:
    """(top, left) where ``crop`` sits in ``big``, or in ``big`` mirrored (then counted in the
    mirrored image), found by exhaustive search: independent of data/__init__.py's arithmetic."""
    R = crop.shape[0]
    best, where = np.inf, None
    for view in (big, big[:, ::-1]):
        for t in range(big.shape[0] - R + 1):
            for l in range(big.shape[1] - R + 1):
                err = np.abs(view[t:t + R, l:l + R] - crop).mean()
                if err < best:
                    best, where = err, (t, l)
    assert best < 1.0, best  # the same resize gives the same pixels
    return where


@pytest.fixture(scope="module")
def bundle(tiny):
    b = models.build_model("sdxl", tiny)
    b.unet.eval()
    return b


def test_sdxl_time_ids_from_real_original_size_and_crop(tmp_path, pipe, bundle):
    """Items carry the original (h, w) and the crop's (top, left); models.image_conditions turns
    them into time_ids laid out as StableDiffusionXLPipeline._get_add_time_ids; losers sampled by
    replay get the sampler's (R, R, 0, 0, R, R)."""
    R, sizes = 16, [(40, 24), (20, 36)]  # (w, h): landscape and portrait, neither square
    lines = []
    for i, (w, h) in enumerate(sizes):
        arr = np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"thing {i}"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    crops = []
    for random_crop, hflip in [(False, False), (True, True)]:
        ds = data.ImageFolderDataset(tmp_path, resolution=R, random_crop=random_crop, hflip=hflip, seed=3)
        items = [ds[i] for i in range(len(sizes))]
        for i, (item, (w, h)) in enumerate(zip(items, sizes)):
            assert item["original_size"] == (h, w)
            s = R / min(w, h)  # the shorter side resized to R
            img = Image.open(tmp_path / f"{i}.png").convert("RGB")
            big = np.asarray(img.resize((max(R, round(w * s)), max(R, round(h * s))), Image.BILINEAR), np.float32)
            crop = (item["x0_w"].permute(1, 2, 0).numpy() + 1) * 127.5
            assert item["crop_top_left"] == _find_crop(big, crop), (random_crop, hflip, i)
            crops.append(item["crop_top_left"])
        batch = data.collate([{**it, "index": 0} for it in items])
        assert batch["original_size"].shape == (2, 2) and batch["crop_top_left"].shape == (2, 2)
        _, extra = models.encode_prompts(bundle, batch["prompt"], return_extra=True)
        extra_w, extra_l = models.image_conditions(bundle, batch, extra)
        for row, it in zip(extra_w["time_ids"], items):
            want = pipe._get_add_time_ids(it["original_size"], it["crop_top_left"], (R, R), torch.float32,
                                          pipe.text_encoder_2.config.projection_dim)[0]
            assert torch.equal(row, want)
        assert extra_l["time_ids"].tolist() == [[R, R, 0, 0, R, R]] * 2  # replayed losers: the sampler's
    assert len({c for c in crops if c != (0, 0)}) >= 2  # crops that (0, 0) or a swap would get wrong


def test_sdxl_sampler_equals_pipeline(bundle, pipe):
    """sampling.sample == StableDiffusionXLPipeline(output_type="latent"), same seed, DDIM steps
    and guidance: both encoders' penultimate states, pooled text_embeds, time_ids, zeros as the
    unconditional input (force_zeros_for_empty_prompt) and, without it, the encoding of ""."""
    b = bundle
    prompts, H, W = ["a red ball on grass", "a blue cube"], 128, 192  # not square: (h, w) order matters
    shape = (4, H // 8, W // 8)  # the stand-in's VAE has the release's factor 8
    for force_zeros in (True, False):
        b.force_zeros_for_empty_prompt = force_zeros
        pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
        for w in (1.0, 5.0):
            want = pipe(prompts, height=H, width=W, num_inference_steps=3, guidance_scale=w, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images
            got = sampling.sample(b, sampling.policy_denoiser(b), prompts, num_inference_steps=3, guidance_scale=w,
                                  generator=torch.Generator().manual_seed(0), latent_shape=shape)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    pipe.register_to_config(force_zeros_for_empty_prompt=True)
    b.force_zeros_for_empty_prompt = True
    # zeros and "" give different guided samples, so the loop above checked two distinct paths
    assert not torch.allclose(got, sampling.sample(b, sampling.policy_denoiser(b), prompts, num_inference_steps=3,
                                                   guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                                                   latent_shape=shape))


FRESH = r"""
import sys, torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file
pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
img = pipe("a red ball", height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
           generator=torch.Generator().manual_seed(0)).images[0]
img.save(sys.argv[2])
trained = load_file(sys.argv[3])
params = dict(pipe.unet.named_parameters())
diff = max((params[k] - v).abs().max().item() for k, v in trained.items() if k in params)
print("SIZE", img.size, "MATCHED", sum(k in params for k in trained), "DIFF", diff)
"""


def test_sdxl_every_method_trains_and_final_loads_in_plain_diffusers(tiny, tmp_path):
    """The end-to-end test: every method runs 2 updates on the stand-in through train.run (one
    process); then a full fine-tune's and a LoRA run's final/ load with
    StableDiffusionXLPipeline.from_pretrained in a fresh process (no project code) and generate
    an image, with the UNet weights the run trained."""
    _write_pickapic(tmp_path / "pick", n=3)
    outs = {}
    for method, lora in [("sspo", 0), ("sspo", 2), ("dpo", 0), ("sft", 0), ("spin", 0), ("sspo_r", 0),
                         ("dpo_cm", 0), ("sdpo", 0)]:
        out = tmp_path / f"{method}_{lora}"
        train.run({**RUN, "method": method, "lora_rank": lora, "model_path": tiny, "save_merged_pipeline": bool(lora),
                   "data_path": str(tmp_path / "pick"), "out_dir": str(out)})
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows), method
        w0, w2 = _weights(out, 1), _weights(out, 2)
        assert any(not torch.equal(w0[k], w2[k]) for k in w0), method
        outs[(method, lora)] = out
    for key in [("sspo", 0), ("sspo", 2)]:
        out = outs[key]
        trained = _weights(out, 2)
        if key[1]:  # LoRA: compare the merged UNet of final/ with base + B @ A instead
            trained = _merged_lora(tiny, trained)
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in trained.items()}, str(tmp_path / "trained.safetensors"))
        if key[1]:  # a LoRA run's final/ is the adapter in diffusers' format; merged/ the full pipeline
            assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
        final = out / "final" / ("merged" if key[1] else "")
        r = subprocess.run([sys.executable, "-c", FRESH, str(final), str(tmp_path / "img.png"),
                            str(tmp_path / "trained.safetensors")], capture_output=True, text=True, timeout=HANG_GUARD_S,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        line = [s for s in r.stdout.splitlines() if s.startswith("SIZE")][0]
        assert "SIZE (32, 32)" in line and float(line.split("DIFF")[1]) < 1e-6, line
        assert int(line.split("MATCHED")[1].split()[0]) == len(trained) > 0, line
        assert Image.open(tmp_path / "img.png").size == (32, 32)


def _merged_lora(tiny: str, lora: dict) -> dict:
    """What final/'s UNet must hold for a LoRA run: each target's base weight + (alpha/r) B @ A."""
    from diffusers import UNet2DConditionModel
    base = dict(UNet2DConditionModel.from_pretrained(tiny, subfolder="unet").named_parameters())
    merged = {}
    for k, a in lora.items():
        if ".lora_A.default." in k:
            bkey = k.replace("lora_A", "lora_B")
            name = k.replace(".lora_A.default.weight", ".weight")
            merged[name] = base[name].detach() + lora[bkey] @ a  # alpha = r: scale 1
    return merged


@pytest.mark.slow
def test_sdxl_two_processes_and_resume(tiny, tmp_path):
    """torchrun, 2 processes (gloo): SSPO with LoRA on Pick-a-Pic runs 1 update, then resumes to 2."""
    _write_pickapic(tmp_path / "pick", n=3)
    args = [f"--{k}={v}" for k, v in {**RUN, "batch_size": 1, "method": "sspo", "lora_rank": 2, "model_path": tiny,
                                      "data_path": tmp_path / "pick", "out_dir": tmp_path / "run"}.items()]
    args.insert(0, "--config=digits")  # the small settings of RUN, not the SDXL preset the model folder names
    r = _torchrun(2, [*args, "--max_steps=1"])
    assert "global batch 1 x 1 accum x 2 procs = 2" in r.stdout
    r = _torchrun(2, [*args, "--max_steps=2", "--resume"])
    assert "resumed from step 1" in r.stdout + r.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").exists()  # LoRA: the adapter


def test_sdxl_vae_runs_in_float32_under_fp16_autocast(bundle):
    """SDXL's VAE overflows in fp16: encode/decode ignore an fp16 autocast and run in float32."""
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = models.encode_pixels(bundle, x, generator=g())
    with torch.autocast("cpu", dtype=torch.float16):
        z = models.encode_pixels(bundle, x, generator=g())
        px = models.decode_latents(bundle, z)
    assert z.dtype == px.dtype == torch.float32
    torch.testing.assert_close(z, plain, rtol=0, atol=0)
