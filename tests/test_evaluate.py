"""Tests for evaluate.py and scoring/scorers.py: metric math against scipy/skimage, the digits judge,
digit sampling against diffusers' StableDiffusionPipeline, every CLIP-based scorer end to end
on a tiny random-weight CLIP saved in the real layout, prompt files, generate/score CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_GUARD_S
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

import digits
import digits.judge
import evaluate
import models
from models import animatediff, common, sd15
from scoring import prompts, scorers


# ----------------------------------------------------------------------------- metric math

def _random_gaussian(rng, d):
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    for d in (1, 4, 16):
        (mu1, s1), (mu2, s2) = _random_gaussian(rng, d), _random_gaussian(rng, d)
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
        assert scorers.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-8)
    assert scorers.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)
    # from samples, including fewer samples than dimensions (singular covariance): finite, >= 0
    f1, f2 = rng.normal(size=(10, 16)), rng.normal(size=(10, 16)) + 1
    fd = scorers.frechet_distance_from_features(f1, f2)
    assert np.isfinite(fd) and fd > 16 * 0.5


def test_psnr_matches_skimage():
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, size=(2, 3, 8, 8))
    b = np.clip(a + 0.1 * rng.normal(size=a.shape), -1, 1)
    assert scorers.psnr(a, b, 2.0) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=2.0), rel=1e-10)
    u, v = rng.integers(0, 256, (16, 16, 3)), rng.integers(0, 256, (16, 16, 3))
    assert scorers.psnr(u, v, 255) == pytest.approx(peak_signal_noise_ratio(u, v, data_range=255), rel=1e-10)
    assert scorers.psnr(a, a, 2.0) == float("inf")
    with pytest.raises(ValueError, match="equal shapes"):
        scorers.psnr(a, a[0], 2.0)


# ----------------------------------------------------------------------------- the digits judge

@pytest.fixture(scope="module")
def splits():
    return digits.load_digits_splits(seed=digits.SPLIT_SEED)


@pytest.fixture(scope="module")
def judge(splits):
    return digits.judge.DigitsJudge.from_splits(splits)


def test_judge_real_digits_far_above_chance_shuffled_near_chance(judge, splits):
    x, y = splits["eval"]
    real = judge.score(x, y)
    assert judge.real_accuracy == real["accuracy"] > 0.95
    assert real["confidence"] > 0.85
    shuffled = judge.score(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))])
    assert shuffled["accuracy"] < 0.2 and shuffled["confidence"] < 0.25
    # Frechet distance: held-out real digits are close to the eval reference, noise is far
    noise = torch.rand(len(x), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd_align = judge.score(*splits["align"])["frechet"]
    assert real["frechet"] == pytest.approx(0, abs=1e-6)
    assert judge.score(noise, y)["frechet"] > 10 * fd_align
    assert judge.features(x).shape == (len(x), 32)


# ----------------------------------------------------------------------------- digit generation

@pytest.fixture(scope="module")
def digits_bundle():
    return models.build_model("digits")


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_generate_digits_matches_stable_diffusion_pipeline(digits_bundle, guidance):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    b = digits_bundle
    prompts = ["a handwritten digit seven", "the number two, written by hand", "a scan of the numeral one"]
    ours = digits.judge.generate_digits(b, prompts, guidance_scale=guidance, num_inference_steps=5, seed=3, batch_size=2)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                   scheduler=DDIMScheduler.from_config(b.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    # vae=None -> vae_scale_factor 8, so 64 px means the UNet's 8x8 pixel grid
    ref = torch.cat([pipe(p, height=64, width=64, num_inference_steps=5, guidance_scale=guidance, generator=g,
                          output_type="latent").images for p in (prompts[:2], prompts[2:])])
    assert ours.shape == (3, 1, 8, 8)
    torch.testing.assert_close(ours, ref.clamp(-1, 1), atol=1e-4, rtol=1e-4)
    assert b.unet.training  # restored


def test_digit_prompts_are_balanced():
    prompts, labels = digits.judge.digit_prompts(digits.HELDOUT_TEMPLATES, 45)
    k = -(-45 // (10 * len(digits.HELDOUT_TEMPLATES)))
    assert len(prompts) == len(labels) == 10 * k * len(digits.HELDOUT_TEMPLATES)
    assert np.bincount(labels).tolist() == [k * len(digits.HELDOUT_TEMPLATES)] * 10
    assert prompts[0] == digits.digit_caption(labels[0], digits.HELDOUT_TEMPLATES[0])
    assert not set(prompts) & {digits.digit_caption(d, t) for d in range(10) for t in digits.TRAIN_TEMPLATES}


def test_evaluate_digits_model_reports_every_condition(digits_bundle, judge, monkeypatch):
    calls, real = {}, digits.judge.generate_digits

    def spy(bundle, prompts, guidance_scale, **kw):
        calls[len(calls)] = (list(prompts), guidance_scale)
        return real(bundle, prompts, guidance_scale=guidance_scale, **kw)

    monkeypatch.setattr(digits.judge, "generate_digits", spy)
    res = digits.judge.evaluate_model(digits_bundle, judge, n_per_condition=20, num_inference_steps=2, seed=0,
                                guidance_scale=2.5)
    # id = training caption templates, ood = held-out ones; cfg = the guidance asked for, nocfg = 1
    train_caps = {digits.digit_caption(d, t) for d in range(10) for t in digits.TRAIN_TEMPLATES}
    heldout_caps = {digits.digit_caption(d, t) for d in range(10) for t in digits.HELDOUT_TEMPLATES}
    (p0, g0), (p1, g1), (p2, g2), (p3, g3) = (calls[i] for i in range(4))  # id_cfg, id_nocfg, ood_cfg, ood_nocfg
    assert (g0, g1, g2, g3) == (2.5, 1.0, 2.5, 1.0)
    assert set(p0) <= train_caps and set(p1) <= train_caps and set(p2) <= heldout_caps and set(p3) <= heldout_caps
    for split in ("id", "ood"):
        for g in ("cfg", "nocfg"):
            acc = res[f"{split}_{g}/accuracy"]
            assert 0 <= acc <= 1 and res[f"{split}_{g}/frechet"] > 0
    assert len(res) == 12
    again = digits.judge.evaluate_model(digits_bundle, judge, n_per_condition=20, num_inference_steps=2, seed=0,
                                           conditions=("ood_nocfg",))
    assert again == {k: v for k, v in res.items() if k.startswith("ood_nocfg")}  # seeded: reproducible


# ----------------------------------------------------------------------------- tiny CLIP, real layout

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    path = tmp_path_factory.mktemp("clip")
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    common.clip_tokenizer().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _images(n, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a red cube on a table", "a dog", "an oil painting of a lighthouse at night"]


def _reference_logits(path, images, prompts):
    """logit_scale * cos from CLIPModel.forward (pad to 77, no mask), independent of the scorer."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
    model = CLIPModel.from_pretrained(path).eval()
    tok = CLIPTokenizer.from_pretrained(path)(prompts, padding="max_length", max_length=77, return_tensors="pt")
    px = CLIPImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tok.input_ids, pixel_values=px)
    return out.logits_per_image.diagonal(), model.logit_scale.exp().item()


def test_clip_score_and_pickscore_end_to_end(tiny_clip):
    imgs = _images(3)
    logits, scale = _reference_logits(tiny_clip, imgs, PROMPTS)
    clip = scorers.CLIPScorer(tiny_clip, "clip")(imgs, PROMPTS)
    pick = scorers.CLIPScorer(tiny_clip, "pick", processor_path=tiny_clip)(imgs, PROMPTS)
    assert clip.shape == pick.shape == (3,)
    np.testing.assert_allclose(pick, logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(clip, 100 * np.clip(logits.numpy() / scale, 0, None), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="2 prompts"):
        scorers.CLIPScorer(tiny_clip)(imgs, PROMPTS[:2])


@pytest.mark.parametrize("fmt", [".pth", ".safetensors"])
def test_aesthetic_score_end_to_end(tiny_clip, tmp_path, fmt):
    torch.manual_seed(1)
    head = scorers.AestheticHead(16)
    state = {k: v.contiguous() for k, v in head.state_dict().items()}
    assert sorted(state)[:2] == ["layers.0.bias", "layers.0.weight"]  # the published key names
    path = tmp_path / f"head{fmt}"
    if fmt == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file(state, str(path))
    imgs = _images(2, seed=5)
    got = scorers.AestheticScorer(tiny_clip, path)(imgs)
    emb = scorers.CLIPScorer(tiny_clip).image_embeds(imgs)
    h = emb
    for i in (0, 2, 4, 6, 7):  # dropout is identity at eval
        h = F.linear(h, state[f"layers.{i}.weight"], state[f"layers.{i}.bias"])
    np.testing.assert_allclose(got, h.squeeze(-1).numpy(), rtol=1e-5, atol=1e-6)
    torch.save({"layers.0.weight": torch.zeros(1024, 768)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="projection dim"):
        scorers.AestheticScorer(tiny_clip, tmp_path / "wrong.pth")


class TinyI3D(torch.nn.Module):  # the StyleGAN-V i3d_torchscript.pt call signature
    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = True) -> torch.Tensor:
        return torch.stack([x.mean((1, 2, 3, 4)), x.std((1, 2, 3, 4)), x[:, 0].mean((1, 2, 3))], 1)


def _write_tiny_i3d(path):
    torch.jit.script(TinyI3D()).save(str(path))
    return path


def test_video_metrics_end_to_end(tiny_clip, tmp_path):
    g = torch.Generator().manual_seed(0)
    fake = [torch.rand(4, 3, 32, 32, generator=g) for _ in range(3)]
    real = [(v + 0.05 * torch.randn(v.shape, generator=g)).clamp(0, 1) for v in fake]
    clip = scorers.CLIPScorer(tiny_clip)
    expected = np.mean([peak_signal_noise_ratio(a.numpy(), b.numpy(), data_range=1.0) for a, b in zip(fake[0], real[0])])
    assert scorers.video_psnr(fake[0], real[0]) == pytest.approx(expected, rel=1e-6)
    frame_scores = clip(scorers.frames_to_pil(fake[0]), [PROMPTS[0]] * 4)
    assert scorers.per_frame_clip_score(clip, fake[0], PROMPTS[0]) == pytest.approx(frame_scores.mean(), rel=1e-6)
    frames = [f for v in fake for f in scorers.frames_to_pil(v)]
    other = [f for v in fake for f in scorers.frames_to_pil(1 - v)]
    assert scorers.clip_fid(clip, frames, frames) == pytest.approx(0, abs=1e-5)
    assert scorers.clip_fid(clip, frames, other) > 1e-3

    _write_tiny_i3d(tmp_path / "i3d.pt")
    fvd = scorers.FVD(tmp_path / "i3d.pt")
    assert fvd.features(fake).shape == (3, 3)
    assert fvd(fake, fake) == pytest.approx(0, abs=1e-8) and fvd(fake, [1 - v for v in fake]) > 0


def test_missing_weights_give_one_clear_message(tmp_path, tiny_clip):
    with pytest.raises(FileNotFoundError, match="CLIP score model: weights not found"):
        scorers.CLIPScorer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="PickScore model: no config.json"):
        scorers.CLIPScorer(tmp_path, "pick")
    with pytest.raises(FileNotFoundError, match="LAION aesthetic head: weights not found"):
        scorers.AestheticScorer(tiny_clip, tmp_path / "head.pth")
    with pytest.raises(FileNotFoundError, match="FVD I3D detector.*only computed when"):
        scorers.FVD(None)


# ----------------------------------------------------------------------------- prompt sets

def test_load_prompts_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"caption": ["a cat", "a dog"], "best_image_uid": ["x", "y"]}), tmp_path / "val.parquet")
    assert prompts.load_prompts(tmp_path / "val.parquet") == ["a cat", "a dog"]
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\nbird\tAnimals\na, comma\tArt\n")
    assert prompts.load_prompts(tmp_path / "parti.tsv") == ["bird", "a, comma"]
    hps = tmp_path / "hps"
    hps.mkdir()
    (hps / "anime.json").write_text(json.dumps(["p1", "p2"]))
    (hps / "photo.json").write_text(json.dumps(["p3"]))
    assert prompts.load_prompts(hps) == ["p1", "p2", "p3"]
    assert prompts.load_prompts(hps, limit=2) == ["p1", "p2"]
    (tmp_path / "p.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    assert prompts.load_prompts(tmp_path / "p.jsonl") == ["x", "y"]
    (tmp_path / "p.csv").write_text("id,prompt\n1,hello\n")
    assert prompts.load_prompts(tmp_path / "p.csv") == ["hello"]
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert prompts.load_prompts(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "bad.csv").write_text("id,title\n1,hello\n")
    with pytest.raises(ValueError, match="bad.csv: no caption column.*found \\['id', 'title'\\]"):
        prompts.load_prompts(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("caption\nok\n \n")
    with pytest.raises(ValueError, match="empty prompt in row 1"):
        prompts.load_prompts(tmp_path / "empty.csv")
    with pytest.raises(FileNotFoundError, match="prompt set not found"):
        prompts.load_prompts(tmp_path / "missing.parquet")


# ----------------------------------------------------------------------------- generate + score CLI

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return sd15.write_tiny(str(tmp_path_factory.mktemp("sd15")))


def test_generate_and_score_cli(tiny_sd, tiny_clip, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    common = ["generate", "--checkpoint", tiny_sd, "--prompts", str(tmp_path / "prompts.txt"),
              "--steps", "2", "--seed", "7"]
    evaluate.main(common + ["--out", str(tmp_path / "a"), "--batch-size", "2"])
    evaluate.main(common + ["--out", str(tmp_path / "b"), "--batch-size", "3"])
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [it["prompt"] for it in manifest["items"]] == PROMPTS
    assert [it["seed"] for it in manifest["items"]] == [7, 8, 9]
    a = [np.asarray(Image.open(tmp_path / "a" / it["file"])) for it in manifest["items"]]
    b = [np.asarray(Image.open(tmp_path / "b" / it["file"])) for it in manifest["items"]]
    assert a[0].shape == (64, 64, 3)  # the UNet's sample_size 8 x the VAE's factor 8, as the pipeline sizes it
    # per-prompt seeds: batch size does not matter, up to float rounding of batched convolutions,
    # which can flip a pixel by one 8-bit level (seen at 64 px, the stand-in's factor-8 VAE)
    diffs = [np.abs(x.astype(int) - y.astype(int)) for x, y in zip(a, b)]
    assert all(d.max() <= 1 and d.mean() < 0.01 for d in diffs), [(d.max(), d.mean()) for d in diffs]
    assert not np.array_equal(a[0], a[1])
    evaluate.main(["score", "--generated", str(tmp_path / "a"), "--clip", str(tiny_clip),
                   "--pickscore", str(tiny_clip), "--reference", str(tmp_path / "b" / "images"),
                   "--clip-fid", str(tiny_clip)])
    scores = json.loads((tmp_path / "a" / "scores.json").read_text())
    expected = scorers.CLIPScorer(tiny_clip)([Image.open(tmp_path / "a" / it["file"]).convert("RGB")
                                              for it in manifest["items"]], PROMPTS)
    assert scores["mean"]["clip_score"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert [r["clip_score"] for r in scores["per_item"]] == pytest.approx(expected.tolist(), rel=1e-5)
    assert scores["mean"]["clip_fid"] == pytest.approx(0, abs=1e-4)  # identical images
    assert set(scores["mean"]) == {"clip_score", "pickscore", "clip_fid"}  # labelled CLIP-FID, with its model
    assert scores["clip_fid_model"] == str(tiny_clip) and "is CLIP-FID" in capsys.readouterr().out


def test_generate_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a diffusers pipeline directory"):
        evaluate.load_pipeline("sd15", tmp_path)


def test_animatediff_generation_writes_gifs(tiny_sd, tmp_path):
    adapter = animatediff.write_tiny_motion_adapter(str(tmp_path / "adapter"))
    pipe = evaluate.load_pipeline("animatediff", tiny_sd, motion_adapter=adapter)
    manifest = json.loads(evaluate.generate(pipe, ["a cat walking"], tmp_path / "out", num_inference_steps=2,
                                            num_frames=3).read_text())
    assert manifest["kind"] == "video"
    video = scorers.load_video(tmp_path / "out" / manifest["items"][0]["file"])
    assert video.shape == (3, 3, 64, 64)  # sample_size 8 x the VAE factor 8


def test_score_videos(tiny_clip, tmp_path):
    g = torch.Generator().manual_seed(0)
    videos = [torch.rand(3, 3, 16, 16, generator=g) for _ in range(3)]
    (tmp_path / "gen" / "videos").mkdir(parents=True)
    (tmp_path / "ref").mkdir()
    from diffusers.utils import export_to_gif
    for i, v in enumerate(videos):
        export_to_gif(scorers.frames_to_pil(v), str(tmp_path / "gen" / "videos" / f"{i:05d}.gif"))
        export_to_gif(scorers.frames_to_pil(v.flip(-1)), str(tmp_path / "ref" / f"{i:05d}.gif"))
    items = [{"file": f"videos/{i:05d}.gif", "prompt": PROMPTS[i], "seed": i} for i in range(3)]
    (tmp_path / "gen" / "manifest.json").write_text(json.dumps({"kind": "video", "items": items}))
    out = scorers.score_generated(tmp_path / "gen", clip=tiny_clip, reference=tmp_path / "ref", clip_fid_model=tiny_clip,
                                  i3d=_write_tiny_i3d(tmp_path / "i3d.pt"))
    gen = [scorers.load_video(tmp_path / "gen" / it["file"]) for it in items]
    ref = [scorers.load_video(tmp_path / "ref" / f"{i:05d}.gif") for i in range(3)]
    clip = scorers.CLIPScorer(tiny_clip)
    assert out["per_item"][1]["clip_score"] == pytest.approx(scorers.per_frame_clip_score(clip, gen[1], PROMPTS[1]), rel=1e-5)
    assert out["mean"]["psnr"] == pytest.approx(np.mean([scorers.video_psnr(a, b) for a, b in zip(gen, ref)]))
    assert np.isfinite(out["mean"]["psnr"]) and out["mean"]["clip_fid"] > 0 and "fvd" in out["mean"]
    with pytest.raises(FileNotFoundError, match="no file for 3 generated items"):
        scorers.score_generated(tmp_path / "gen", reference=tmp_path / "gen")


def test_lora_on_top_of_base_changes_the_output(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=models.LORA_TARGETS))
    with torch.no_grad():  # gaussian init leaves lora_B = 0; make the adapter matter
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    outs = {}
    for name, lora in (("base", None), ("lora", tmp_path / "lora")):
        pipe = evaluate.load_pipeline("sd15", tiny_sd, lora=lora)
        manifest = json.loads(evaluate.generate(pipe, ["a cat"], tmp_path / name, num_inference_steps=2).read_text())
        outs[name] = np.asarray(Image.open(tmp_path / name / manifest["items"][0]["file"]), dtype=float)
    assert np.abs(outs["base"] - outs["lora"]).mean() > 1.0


def test_generate_from_full_finetune_checkpoints(tmp_path):
    """`generate --checkpoint run/checkpoints/step_N` of a full fine-tune: the last step gives the
    same image as final/ loaded by diffusers' own StableDiffusionPipeline.from_pretrained, an
    earlier step a different one, and both differ from the base model."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_train import _write_pickapic
    import train
    sd = sd15.write_tiny(str(tmp_path / "sd15"))
    _write_pickapic(tmp_path / "pickapic")
    run = tmp_path / "run"
    assert train.main(["--config=digits", "--model=sd15", f"--model_path={sd}", "--data=pickapic", f"--data_path={tmp_path / 'pickapic'}",
                       "--method=dpo", "--max_steps=2", "--batch_size=1", "--save_every=1", "--loser_steps=2",
                       "--resolution=16", "--sample_every=0", "--learning_rate=1e-2", "--num_workers=0",
                       f"--out_dir={run}"]) == 0
    assert (run / "final" / "model_index.json").is_file()  # a full fine-tune, not an adapter
    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    imgs = {}
    for name, ckpt in (("base", sd), ("step1", run / "checkpoints" / "step_000001"),
                       ("step2", run / "checkpoints" / "step_000002"), ("final", run / "final")):
        evaluate.main(["generate", "--checkpoint", str(ckpt), "--prompts", str(tmp_path / "p.txt"),
                       "--out", str(tmp_path / name), "--steps", "3"])
        imgs[name] = np.asarray(Image.open(tmp_path / name / "images" / "00000.png"), dtype=float)
    assert np.array_equal(imgs["step2"], imgs["final"])
    assert np.abs(imgs["step1"] - imgs["step2"]).mean() > 0.1 and np.abs(imgs["base"] - imgs["step2"]).mean() > 0.1


# ----------------------------------------------------------------------------- every family, one sampler

def _evaluate_cli(*argv, timeout=HANG_GUARD_S):
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "evaluate.py"), *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("family,size,frames", [("sdxl", (16, 16), 0), ("cogvideox", (32, 48), 9),
                                                ("wan", (32, 48), 5)])
def test_generate_reads_the_family_and_runs_every_family(family, size, frames, tmp_path):
    """No --family: the family comes from the model directory; images as PNG, videos as frames."""
    import importlib
    from PIL import Image
    path = importlib.import_module(f"models.{family}").write_tiny(str(tmp_path / family))
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    args = ["generate", "--checkpoint", path, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "gen",
            "--steps", "2", "--height", size[0], "--width", size[1]] + (["--num-frames", frames] if frames else [])
    r = _evaluate_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "\r" not in r.stderr  # piped: progress lines, no tqdm bar
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert manifest["family"] == family and len(manifest["items"]) == 2
    if frames:
        shots = sorted((tmp_path / "gen" / "videos" / "00000").glob("*.png"))
        assert len(shots) >= 2
        with Image.open(shots[0]) as im:
            assert im.size == (size[1], size[0])
    else:
        with Image.open(tmp_path / "gen" / manifest["items"][0]["file"]) as im:
            assert im.size == (size[1], size[0])


def test_score_mistakes_are_one_line_and_exit_2(tmp_path):
    from PIL import Image
    gen = tmp_path / "gen"
    (gen / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(gen / "images" / "00000.png")
    (gen / "manifest.json").write_text(json.dumps({"kind": "image", "items": [
        {"file": "images/00000.png", "prompt": "a cat", "seed": 0}]}))
    cases = [([], "no scorer given"),
             (["--pickscore", tmp_path / "nope", "--pickscore-processor", tmp_path / "nope"], "no such file"),
             (["--hpsv2", tmp_path / "HPS_v2.1_compressed.pt"], "no such file"),
             (["--reference", gen], "--reference is compared only by --clip-fid")]
    for extra, message in cases:
        r = _evaluate_cli("score", "--generated", gen, *extra)
        assert r.returncode == 2, (extra, r.stdout, r.stderr[-2000:])
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (extra, r.stderr)
