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
import sampling
import importance
import sspo
import sspo_flow
import train
from families import cogvideox, wan

PROMPTS = ["a red cat walking in the city", "a dog"]
RES, FRAMES = 32, 9  # latents (16, 3, 4, 4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("video_models")
    return {"cogvideox": cogvideox.write_tiny(str(d / "cogvideox")), "wan": wan.write_tiny(str(d / "wan")),
            "wan_euler": wan.write_tiny(str(d / "wan_euler"), scheduler="FlowMatchEulerDiscreteScheduler")}


def _pipeline_latents(family, path, z, steps, guidance):
    from diffusers import CogVideoXPipeline, WanPipeline
    pipe = (CogVideoXPipeline if family == "cogvideox" else WanPipeline).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    zl = z.permute(0, 2, 1, 3, 4) if family == "cogvideox" else z  # CogVideoX latents are (B,F,C,H,W)
    out = pipe(PROMPTS, height=RES, width=RES, num_frames=FRAMES, num_inference_steps=steps,
               guidance_scale=guidance, latents=zl.clone(), output_type="latent").frames
    return out.permute(0, 2, 1, 3, 4) if family == "cogvideox" else out


@pytest.mark.parametrize("family", ["cogvideox", "wan", "wan_euler"])
def test_cogvideo_and_wan_sampler_equals_pipeline(family, tiny):
    """sampling.sample with the family's own scheduler (CogVideoXDDIM v-pred trailing; Wan's
    UniPC flow and FlowMatchEuler with shift 3) == the diffusers pipeline, output_type="latent"."""
    name = "wan" if family.startswith("wan") else family
    b = models.build_model(name, tiny[family], num_frames=FRAMES)
    shape = models.latent_shape(b, RES, FRAMES)
    assert shape == (16, 3, 4, 4)
    z = torch.randn(len(PROMPTS), *shape, generator=torch.Generator().manual_seed(0))
    ours = sampling.sample(b, sampling.policy_denoiser(b), PROMPTS, latents=z, latent_shape=shape,
                           num_inference_steps=3, guidance_scale=5.0)
    ref = _pipeline_latents(name, tiny[family], z, 3, 5.0)
    assert (ours - z).abs().max() > 0.1  # the sampler moved
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_cogvideo_zero_terminal_snr_is_safe_in_the_loop(tiny):
    """The loop's noise process for CogVideoX's config: v-prediction on CogVideoXDDIMScheduler's
    alphas_cumprod (abar_{T-1} = 0); at t = T-1, x_t = eps, target v = -x0, and the importance
    weight (DPO-C&M / SDPO) is finite and <= 0 in log, equal to lambda_t abar_t elsewhere."""
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
    err, ref = torch.tensor([0.3, 0.2, 0.5]), torch.tensor([0.1, 0.1, 0.1])
    log_w = p.pair_log_weight(err, err, ref, ref, t, num_values=16)
    assert torch.isfinite(log_w).all() and (log_w <= 0).all()
    lam_abar = importance.importance_coef(t[:2], p.schedule, "v_prediction")  # = lambda_t * abar_t
    torch.testing.assert_close(log_w[:2], -2 * 16 * lam_abar * (err - ref)[:2])
    # eps from v stays finite at the terminal step (eps = x_t there)
    assert torch.equal(sspo.eps_from_v(target, x_t, t, p.abar)[2], x_t[2])


def test_wan_flow_noise_process_matches_scheduler(tiny):
    """Wan's config (UniPC, flow_prediction, flow_shift 3) gives flow matching: x_t and the
    model's timestep equal FlowMatchEulerDiscreteScheduler(shift=3).scale_noise / timesteps at
    the same sigma; the target is eps - x0; the weight is sspo_flow's."""
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
    err, ref = torch.tensor([0.3, 0.2, 0.5]), torch.tensor([0.1, 0.25, 0.1])
    torch.testing.assert_close(p.pair_log_weight(err, err, ref, ref, t, num_values=8), sspo_flow.flow_pair_log_weight(
        err - ref, err - ref, p.sigmas[t], sspo_flow.flow_sigma_next(t, p.sigmas), scale=8))


def _write_videos(root: Path, n: int = 2, frames: int = FRAMES):
    import av
    import numpy as np
    root.mkdir(parents=True)
    meta, pairs = [], []
    for i in range(2 * n):
        with av.open(str(root / f"v{i}.mp4"), "w") as c:
            st = c.add_stream("mpeg4", rate=8)
            st.width, st.height, st.pix_fmt = 48, 32, "yuv420p"
            for k in range(frames):
                img = np.full((32, 48, 3), (25 * k + 60 * i) % 255, np.uint8)
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
