"""CogVideoX and Wan2.1 on tiny random-weight stand-ins in the releases' layouts: sampler parity
with CogVideoXPipeline / WanPipeline, the noise process the loop builds from each scheduler
config (v-prediction with zero terminal SNR; flow matching), and every method end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models
import noise
from models import sampling
import importance
import sspo
import flow
import train
from models import cogvideox, wan

PROMPTS = ["a red cat walking in the city", "a dog"]
RES, FRAMES = 32, 9  # latents (16, 3, 4, 4)
H, W = 32, 48  # a non-square frame (as 480x720 / 480x832): latents (16, 3, 4, 6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("video_models")
    return {"cogvideox": cogvideox.write_tiny(str(d / "cogvideox")), "wan": wan.write_tiny(str(d / "wan")),
            "wan_euler": wan.write_tiny(str(d / "wan_euler"), scheduler="FlowMatchEulerDiscreteScheduler")}


def _pipeline_latents(family, path, z, steps, guidance, height=RES, width=RES):
    from diffusers import CogVideoXPipeline, WanPipeline
    pipe = (CogVideoXPipeline if family == "cogvideox" else WanPipeline).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    zl = z.permute(0, 2, 1, 3, 4) if family == "cogvideox" else z  # CogVideoX latents are (B,F,C,H,W)
    out = pipe(PROMPTS, height=height, width=width, num_frames=FRAMES, num_inference_steps=steps,
               guidance_scale=guidance, latents=zl.clone(), output_type="latent").frames
    return out.permute(0, 2, 1, 3, 4) if family == "cogvideox" else out


@pytest.mark.parametrize("size", [(RES, RES), (H, W)], ids=["square", "non_square"])
@pytest.mark.parametrize("family", ["cogvideox", "wan", "wan_euler"])
def test_cogvideo_and_wan_sampler_equals_pipeline(family, size, tiny):
    """sampling.sample with the family's own scheduler (CogVideoXDDIM v-pred trailing; Wan's
    UniPC flow and FlowMatchEuler with shift 3) == the diffusers pipeline, output_type="latent",
    at a square and a non-square (height x width) frame."""
    name = "wan" if family.startswith("wan") else family
    b = models.build_model(name, tiny[family], num_frames=FRAMES)
    shape = models.latent_shape(b, size if size[0] != size[1] else size[0], FRAMES)
    assert shape == (16, 3, size[0] // 8, size[1] // 8)
    z = torch.randn(len(PROMPTS), *shape, generator=torch.Generator().manual_seed(0))
    ours = sampling.sample(b, sampling.policy_denoiser(b), PROMPTS, latents=z, latent_shape=shape,
                           num_inference_steps=3, guidance_scale=5.0)
    ref = _pipeline_latents(name, tiny[family], z, 3, 5.0, *size)
    assert (ours - z).abs().max() > 0.1  # the sampler moved
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_cogvideo_zero_terminal_snr_is_safe_in_the_loop(tiny):
    """The loop's noise process for CogVideoX's config: v-prediction on CogVideoXDDIMScheduler's
    alphas_cumprod (abar_{T-1} = 0); at t = T-1, x_t = eps, target v = -x0, and the importance
    weight's coefficient (DPO-C&M / SDPO) is finite and equal to lambda_t abar_t."""
    from diffusers import CogVideoXDDIMScheduler
    b = models.build_model("cogvideox", tiny["cogvideox"], num_frames=FRAMES)
    p = noise.Process.from_config(b.scheduler_config)
    assert p.kind == "ddpm" and p.prediction_type == "v_prediction"
    torch.testing.assert_close(p.abar, CogVideoXDDIMScheduler.from_config(b.scheduler_config).alphas_cumprod.float())
    T = p.num_timesteps
    x0, eps = torch.randn(3, 16, 3, 4, 4), torch.randn(3, 16, 3, 4, 4)
    t = torch.tensor([0, 500, T - 1])
    x_t, target = p.q_sample(x0, t, eps), p.target(x0, eps, t)
    assert p.abar[-1] == 0 and torch.equal(x_t[2], eps[2]) and torch.equal(target[2], -x0[2])
    assert torch.equal(p.model_t(t), t)
    kappa = p.importance_kappa(t)
    assert torch.isfinite(kappa).all() and (kappa > 0).all()
    lam_abar = importance.importance_coef(t, p.schedule, "v_prediction")  # = lambda_t * abar_t
    torch.testing.assert_close(kappa, lam_abar)
    # eps from v stays finite at the terminal step (eps = x_t there)
    assert torch.equal(sspo.eps_from_v(target, x_t, t, p.abar)[2], x_t[2])


def test_wan_flow_noise_process_matches_scheduler(tiny):
    """Wan's config (UniPC, flow_prediction, flow_shift 3) gives flow matching: x_t and the
    model's timestep equal FlowMatchEulerDiscreteScheduler(shift=3).scale_noise / timesteps at
    the same sigma; the target is eps - x0; the weight's coefficient is flow.py's."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    b = models.build_model("wan", tiny["wan"], num_frames=FRAMES)
    p = noise.Process.from_config(b.scheduler_config)
    assert p.kind == "flow"
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    torch.testing.assert_close(p.sigmas, ref.sigmas.flip(0).float())
    t = torch.tensor([0, 400, 999])
    x0, eps = torch.randn(3, 16, 3, 4, 4), torch.randn(3, 16, 3, 4, 4)
    ts = ref.timesteps.flip(0)[t]
    torch.testing.assert_close(p.model_t(t), ts.float())
    for i in range(3):
        torch.testing.assert_close(p.q_sample(x0, t, eps)[i:i + 1], ref.scale_noise(x0[i:i + 1], ts[i:i + 1], eps[i:i + 1]))
    torch.testing.assert_close(p.target(x0, eps, t), eps - x0)
    torch.testing.assert_close(p.importance_kappa(t), flow.flow_importance_kappa(p.sigmas[t], flow.flow_sigma_next(t, p.sigmas)))


def _write_videos(root: Path, n: int = 2, frames: int = FRAMES, hw: tuple = (32, 48)):
    import av
    import numpy as np
    root.mkdir(parents=True)
    meta, pairs = [], []
    for i in range(2 * n):
        with av.open(str(root / f"v{i}.mp4"), "w") as c:
            st = c.add_stream("mpeg4", rate=8)
            st.height, st.width, st.pix_fmt = *hw, "yuv420p"
            for k in range(frames):
                img = np.full((*hw, 3), (25 * k + 60 * i) % 255, np.uint8)
                for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(pkt)
            for pkt in st.encode():
                c.mux(pkt)
    for i in range(n):
        meta.append(json.dumps({"file_name": f"v{2 * i}.mp4", "text": f"a dog number {i}"}))
        pairs.append(json.dumps({"text": f"a dog number {i}", "winner": f"v{2 * i}.mp4", "loser": f"v{2 * i + 1}.mp4"}))
    (root / "metadata.jsonl").write_text("\n".join(meta) + "\n")
    (root / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    return root


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_cogvideo_and_wan_every_method_trains_end_to_end(family, tiny, tmp_path):
    """Every method, 1 update each through train.run on the stand-in (LoRA for SSPO, full
    fine-tuning otherwise), the final directory loads in the diffusers pipeline."""
    data = _write_videos(tmp_path / "videos")
    common = dict(model=family, model_path=tiny[family], num_frames=FRAMES, resolution=RES, batch_size=1,
                  max_steps=1, save_every=1, loser_steps=2, log_every=1, sample_every=0, lr=1e-3, cfg_drop=0.0)
    for method, extra in [("sft", {}), ("sspo", {"lora_rank": 4}), ("dpo", {}), ("dpo_cm", {}), ("sdpo", {})]:
        pairs = method in ("dpo", "dpo_cm", "sdpo")
        out = train.run({**common, **extra, "method": method, "data": "videopairs" if pairs else "videofolder",
                         "data_path": str(data), "out_dir": str(tmp_path / method)})
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert row["step"] == 1 and row["loss"] == row["loss"] and row["grad_norm"] > 0, (method, row)
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "sdpo" / "final")
    assert type(pipe).__name__ == ("CogVideoXPipeline" if family == "cogvideox" else "WanPipeline")


# ----------------------------------------------------------------------------- non-square frames

def test_video_crop_to_height_by_width(tmp_path):
    """The data transform covers height x width with the smallest resize, then crops: (3,F,H,W)
    for both clips of a pair; a square keeps the shorter side = resolution as before."""
    import numpy as np
    import data
    import data.video
    rng = np.random.default_rng(0)
    # 64x40 (w x h) -> cover 16x32 (h x w): scale 0.5 -> 32x20, centre rows 2..18
    assert data._plan_crop(64, 40, (16, 32), False, False, rng) == ((32, 20), (0, 2, 32, 18), False)
    # portrait 30x90 -> cover 16x32: the width binds, scale 32/30 -> 32x96, rows 40..56
    assert data._plan_crop(30, 90, (16, 32), False, False, rng) == ((32, 96), (0, 40, 32, 56), False)
    for _ in range(20):  # random crops stay inside the resized frame and have the asked size
        (w, h), (l, t, r, b), _ = data._plan_crop(64, 40, (16, 32), True, False, rng)
        assert (r - l, b - t) == (32, 16) and 0 <= l and r <= w and 0 <= t and b <= h
    for w, h in [(48, 32), (33, 71), (16, 16)]:  # square: shorter side = 16, centre crop
        (rw, rh), box, _ = data._plan_crop(w, h, 16, False, False, rng)
        assert min(rw, rh) == 16 and max(rw, rh) == round(max(w, h) * 16 / min(w, h))
        assert box == (round((rw - 16) / 2), round((rh - 16) / 2), round((rw - 16) / 2) + 16, round((rh - 16) / 2) + 16)
    root = _write_videos(tmp_path / "v", hw=(40, 64))
    pairs = data.video.VideoPairFolderDataset(root, num_frames=FRAMES, resolution=RES, height=16, width=32)
    folder = data.video.VideoFolderDataset(root, num_frames=FRAMES, resolution=RES, height=16, width=32)
    item = pairs[0]
    assert item["x0_w"].shape == item["x0_l"].shape == folder[0]["x0_w"].shape == (3, FRAMES, 16, 32)
    assert data.video.VideoFolderDataset(root, num_frames=FRAMES, resolution=RES, width=24)[0]["x0_w"].shape == \
        (3, FRAMES, RES, 24)  # height 0 = resolution


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_non_square_training_step_losers_and_sample_grid(family, tiny, tmp_path):
    """SSPO at height x width (32x48) from 40x64 clips: the crop, the VAE, the replayed losers
    (sampler) and the sample grid all run at the non-square size; one update."""
    from PIL import Image
    data = _write_videos(tmp_path / "videos", hw=(40, 64))
    out = train.run(dict(model=family, model_path=tiny[family], num_frames=FRAMES, resolution=RES, height=H, width=W,
                         batch_size=1,
                         max_steps=1, save_every=1, loser_steps=2, log_every=1, sample_every=1, num_sample_prompts=2,
                         lr=1e-3, cfg_drop=0.0, method="sspo", data="videofolder", data_path=str(data),
                         out_dir=str(tmp_path / "run")))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 1 and row["loss"] == row["loss"] and row["grad_norm"] > 0, row
    from infra import runtime
    cell = runtime.labelled(Image.new("RGB", (W, H)), "")  # a W x H sample above its prompt's band
    left = (cell.width - W) // 2  # the sample sits centred in its cell, white on either side
    with Image.open(out / "samples" / "step_000001.png") as grid:
        assert grid.size == (2 * cell.width, cell.height)  # 2 prompts side by side
        px = grid.convert("RGB").load()
        assert left > 0 and all(px[left - 1, y] == px[left + W, y] == (255, 255, 255) for y in range(H))
        assert not all(px[left, y] == (255, 255, 255) for y in range(H))  # the sample is exactly W wide
    assert f"| resolution | {H}x{W} (height x width) |" in (out / "final" / "README.md").read_text()


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_bad_frame_size_is_refused(family, tiny, tmp_path, capsys):
    """Height or width off the 16-pixel grid (VAE 8 x patch 2): exit 2 with one line; height and
    width on an image family, or negative: refused by the config."""
    data = _write_videos(tmp_path / "videos")
    argv = ["--config=digits", f"--model={family}", f"--model_path={tiny[family]}", f"--num_frames={FRAMES}", "--method=sft",
            "--data=videofolder", f"--data_path={data}", f"--out_dir={tmp_path / 'run'}", "--max_steps=1",
            "--batch_size=1"]
    for (h, w) in ((40, W), (H, 40)):
        assert train.main(argv + [f"--height={h}", f"--width={w}"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"{family}: height and width must be multiples of 16" in err, err
        assert f"got {h}x{w} (height x width)" in err, err
    import config
    with pytest.raises(ValueError, match="'height' must be >= 0"):
        config.resolve({"model": family, "data": "videofolder", "data_path": "x", "height": -16})
    cfg = config.resolve({"model": family, "data": "videofolder", "data_path": "x", "height": H, "width": W})
    assert config.frame_size(cfg) == (H, W)
    cfg.resolution = 256  # both sides given: resolution is unused, and says so
    assert f"setting resolution=256 has no effect: height and width ({H}x{W}) are both set" in config.ignored_settings(cfg)
    with pytest.raises(ValueError, match="trains square at --resolution"):
        config.resolve({"model": "sd15", "data": "imagefolder", "data_path": "x", "width": 768})


@pytest.mark.parametrize("family,size", [("wan", (480, 832)), ("cogvideox", (480, 720))])
def test_stand_in_runs_at_the_release_native_frame_size(family, size, tiny):
    """The presets' native frames (Wan2.1 480x832, CogVideoX 480x720) through the tiny stand-in's
    transformer: the stand-in keeps the release's VAE factor 8, patch size 2 and rope table (Wan's
    rope_max_seq_len 1024: 52 patches across), so a run at the preset's size does not crash in the
    positional embedding. 5 frames keep it fast (the rope covers frames as it covers sides)."""
    b = models.build_model(family, tiny[family], num_frames=5)
    shape = models.latent_shape(b, size, 5)
    assert shape[-2:] == (size[0] // 8, size[1] // 8)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = models.unet_forward(b, b.unet, x, torch.tensor([500]), models.encode_prompts(b, PROMPTS[:1]))
    assert out.shape == x.shape and torch.isfinite(out).all()
