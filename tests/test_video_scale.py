"""CogVideoX and Wan2.1 at scale, on the tiny stand-ins: FSDP2 (2 processes, gloo) and DDP equal
one process to float tolerance, the reference a sharded run replays is the drawn checkpoint, and a
resumed run equals an uninterrupted one."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import config
import replay
from models import sharding
import train
from models import cogvideox, wan
from test_video import FRAMES, RES, _write_videos

# 2 updates, then 2 more after a resume; the pool grows every update, so references differ.
ARGS = dict(num_frames=FRAMES, resolution=RES, save_every=1, loser_steps=2, log_every=1, sample_every=0,
            num_sample_prompts=2, lr=1e-3, cfg_drop=0.0, method="sspo", data="videofolder")
# AdamW's step lr * m/(sqrt(v) + eps) moves by up to lr * dg/eps when the gradient moves by dg.
# eps = 1e-4 is far above the gradients' rounding (dg <= ~1e-6; they are clipped to norm <= 1) and
# below most of their entries (median ~5e-4): rounding moves a weight by ~0.01 lr at most per
# update, not by up to ~lr as with the default eps of 1e-8.
ADAM_EPS = 1e-4


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    d = tmp_path_factory.mktemp("video_scale")
    return {"cogvideox": cogvideox.write_tiny(str(d / "cogvideox")), "wan": wan.write_tiny(str(d / "wan")),
            "videos": str(_write_videos(d / "videos"))}


def _weights(out, step: int) -> dict:
    return load_file(str(Path(out) / "checkpoints" / f"step_{step:06d}" / "trainable.safetensors"))


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _worker(rank: int, world: int, ports: list[int], runs: list[dict], log: str) -> None:
    """One rank of a gloo job: train.run each of ``runs`` in turn (a run, then its resume), and
    record, at every reference forward, whether the reference's weights (gathered from their
    shards) are the pool snapshot that ``choose`` drew for that update."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    drawn, checks = {}, []
    real_choose, real_call = replay.CheckpointPool.choose, replay.Reference.__call__

    def choose(self, step):
        drawn.update(pool=self, index=real_choose(self, step))
        return drawn["index"]

    def call(self, *a, **k):
        params = dict(self.unet.named_parameters())
        snap = drawn["pool"].get(drawn["index"])
        checks.append((drawn["index"], sharding.is_sharded(self.unet),
                       all(torch.equal(sharding.full_tensor(params[self._names[n]].detach()), v) for n, v in snap.items())))
        return real_call(self, *a, **k)

    replay.CheckpointPool.choose, replay.Reference.__call__ = choose, call
    for args, port in zip(runs, ports):  # a fresh rendezvous (store) for each process group
        os.environ["MASTER_PORT"] = str(port)
        train.run(args)
    Path(f"{log}.{rank}").write_text(json.dumps(checks))


def _spawn(world: int, runs: list[dict], log: Path) -> list[list]:
    ports = []
    for _ in runs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    mp.spawn(_worker, args=(world, ports, runs, str(log)), nprocs=world, join=True)
    return [json.loads(Path(f"{log}.{r}").read_text()) for r in range(world)]


def _assert_close(out_a, out_b, step: int, lr: float):
    """Weights equal to float tolerance (gradients agree to summation order, and ADAM_EPS bounds
    what AdamW makes of that rounding), and the logged losses and gradient norms too (a norm
    also sees a gradient mis-scaled across ranks, which AdamW's weights hardly do)."""
    a, b = _weights(out_a, step), _weights(out_b, step)
    start = load_file(str(next((Path(out_b) / "replay").glob("replay_0000_*.safetensors"))))  # checkpoint 0
    assert a.keys() == b.keys() == start.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    moved = torch.cat([(b[k] - start[k]).abs().flatten() for k in a])
    assert diff.max() < 0.2 * lr and moved.mean() > 100 * diff.mean(), (diff.max(), diff.mean(), moved.mean())
    for r, q in zip(_rows(out_a), _rows(out_b), strict=True):
        assert r["ref_checkpoint"] == q["ref_checkpoint"] and r["ssr_rate"] == q["ssr_rate"]
        assert r["loss"] == pytest.approx(q["loss"], rel=1e-3, abs=1e-5), (r, q)
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-3), (r, q)


@pytest.mark.parametrize("family,fsdp", [("cogvideox", True), ("wan", True), ("cogvideox", False), ("wan", False)])
def test_two_processes_equal_one_and_replay_the_drawn_checkpoint(family, fsdp, setting, tmp_path):
    """2 processes x batch 1 (FSDP2 fully_shard, or DDP), trained 2 updates then resumed for 2
    more, == 1 process x batch 2 trained 4 updates straight; on every reference forward of the
    2-process run the (sharded) reference holds exactly the drawn pool checkpoint.

    Wan's cross-attention query and key gradients (its attention runs over 512 mostly zero-padded
    text tokens) have entries of ~1e-8 that differ between the two runs by rounding of the same
    size, which AdamW's default eps of 1e-8 turns into weight differences of up to ~lr: these runs
    use ADAM_EPS."""
    common = {**ARGS, "model": family, "model_path": setting[family], "data_path": setting["videos"],
              "adam_epsilon": ADAM_EPS}
    two = {**common, "batch_size": 1, "fsdp": fsdp, "out_dir": str(tmp_path / "two")}
    checks = _spawn(2, [{**two, "max_steps": 2}, {**two, "max_steps": 4, "resume": True}], tmp_path / "log")
    one = train.run({**common, "batch_size": 2, "max_steps": 4, "out_dir": str(tmp_path / "one")})
    _assert_close(tmp_path / "two", one, 4, ARGS["lr"])
    for rank_checks in checks:
        assert rank_checks and all(ok for _, _, ok in rank_checks)
        assert all(sharded == fsdp for _, sharded, _ in rank_checks)
        assert len({i for i, _, _ in rank_checks}) >= 2  # different checkpoints were replayed
    assert [r["step"] for r in _rows(tmp_path / "two")] == [1, 2, 3, 4]
    assert (tmp_path / "two" / "final" / "model_index.json").is_file()  # gathered, in diffusers' layout


def test_fsdp_refuses_what_it_does_not_shard(setting, tmp_path):
    with pytest.raises(ValueError, match="fsdp is for full fine-tuning"):
        config.resolve({**ARGS, "model": "wan", "data_path": "x", "fsdp": True, "lora_rank": 4})
    with pytest.raises(ValueError, match="fsdp shards the cogvideox and wan transformers"):
        config.resolve({"model": "sd15", "data": "imagefolder", "data_path": "x", "fsdp": True})
    with pytest.raises(ValueError, match="with one process, train without --fsdp"):
        train.run({**ARGS, "model": "wan", "model_path": setting["wan"], "data_path": setting["videos"],
                   "batch_size": 1, "max_steps": 1, "fsdp": True, "out_dir": str(tmp_path)})


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_lora_final_loads_in_the_diffusers_pipeline(family, setting, tmp_path):
    """A LoRA run's final/ holds pytorch_lora_weights.safetensors that CogVideoXPipeline /
    WanPipeline.load_lora_weights loads onto the base stand-in; the pipeline's latents change,
    and equal our sampler's with the trained adapter (checkpoints/step_2)."""
    import models
    from models import sampling
    from diffusers import CogVideoXPipeline, WanPipeline
    from test_video import PROMPTS
    out = train.run({**ARGS, "model": family, "model_path": setting[family], "data_path": setting["videos"],
                     "batch_size": 2, "max_steps": 2, "lora_rank": 4, "lr": 1e-2, "out_dir": str(tmp_path)})
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    pipe = (CogVideoXPipeline if family == "cogvideox" else WanPipeline).from_pretrained(setting[family])
    pipe.set_progress_bar_config(disable=True)
    b = models.build_model(family, setting[family], num_frames=FRAMES, lora_rank=4)
    shape = models.latent_shape(b, RES, FRAMES)
    z = torch.randn(len(PROMPTS), *shape, generator=torch.Generator().manual_seed(0))  # (B,C,F,H,W)
    cog = family == "cogvideox"  # its pipeline's latents are (B,F,C,H,W)

    def run_pipe():
        zl = z.permute(0, 2, 1, 3, 4) if cog else z
        lat = pipe(PROMPTS, height=RES, width=RES, num_frames=FRAMES, num_inference_steps=2, guidance_scale=3.0,
                   latents=zl.clone(), output_type="latent").frames
        return lat.permute(0, 2, 1, 3, 4) if cog else lat

    before = run_pipe()
    pipe.load_lora_weights(str(out / "final"))
    after = run_pipe()
    assert (after - before).abs().max() > 1e-3  # the adapter was loaded and acts
    models.load_trainable(b, _weights(out, 2))
    ours = sampling.sample(b, sampling.policy_denoiser(b), PROMPTS, latents=z, latent_shape=shape,
                           num_inference_steps=2, guidance_scale=3.0)
    torch.testing.assert_close(after, ours, atol=2e-5, rtol=1e-4)
