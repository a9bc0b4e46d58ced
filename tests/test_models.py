"""models/__init__.py: tokenizer parity with OpenAI's CLIP BPE, the digits model, the sd15/animatediff
loading path on tiny random-weight directories in the real layout, LoRA and conversions."""
import gzip
import html
import shutil

import pytest
import regex
import torch

import models
from models import animatediff, common, sd15




# ----------------------------------------------------------------------------- tokenizer

def _reference_clip_ids(text: str) -> list[int]:
    """An independent port of OpenAI CLIP's SimpleTokenizer.encode (minus ftfy, ASCII inputs)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b), cs.append(256 + n)
            n += 1
    byte_enc = dict(zip(bs, map(chr, cs)))
    merges = gzip.open(common.clip_bpe_file()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(byte_enc.values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    encoder, ranks = {v: i for i, v in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}

    def bpe(token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

    pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                        regex.IGNORECASE)
    text = " ".join(html.unescape(html.unescape(text)).strip().split()).lower()
    ids = []
    for tok in regex.findall(pat, text):
        tok = "".join(byte_enc[b] for b in tok.encode("utf-8"))
        ids += [encoder[b] for b in bpe(tok)]
    return [49406] + ids + [49407]


def test_tokenizer_matches_clip_reference():
    tok = common.clip_tokenizer()
    assert tok("a photo of").input_ids == [49406, 320, 1125, 539, 49407]  # published SD-1.5 ids
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    for s in ["a handwritten digit seven", "A  Handwritten   DIGIT, number 7!", "it's a sketch of 42 cats",
              "photorealistic astronaut riding a horse on mars", "don't... (really) #3"]:
        assert tok(s).input_ids == _reference_clip_ids(s), s
    padded = tok(["a photo of"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(padded) == 77 and padded[:5] == [49406, 320, 1125, 539, 49407] and set(padded[5:]) == {49407}
    long = tok(["word " * 200], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(long) == 77 and long[-1] == 49407


# ----------------------------------------------------------------------------- digits

def _inputs(B=3, C=1, H=8, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, H, generator=g), torch.tensor([1, 500, 999][:B]), torch.randn(B, 77, D, generator=g)


def _perturb(module, seed=1, scale=0.05, only=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if only is None or only(n):
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_digits_deterministic_and_shapes():
    torch.manual_seed(123)
    before = torch.rand(3)
    a = models.build_model("digits")
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(before, torch.rand(3)) and torch.equal(after, torch.rand(3))  # global RNG untouched
    b = models.build_model("digits")
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert 0.5e6 < sum(p.numel() for p in a.unet.parameters()) < 1.5e6
    assert a.vae is None and a.num_frames == 0 and not a.lora
    assert a.scheduler_config["beta_schedule"] == "scaled_linear" and a.scheduler_config["num_train_timesteps"] == 1000
    assert not any(p.requires_grad for p in a.text_encoder.parameters())
    assert len(a.trainable_parameters()) == len(list(a.unet.parameters()))
    x, t, _ = _inputs()
    emb = models.encode_prompts(a, ["a handwritten digit one", "", "zero"])
    assert emb.shape == (3, 77, 64) and not emb.requires_grad
    assert models.unet_forward(a, a.unet, x, t, emb).shape == x.shape
    assert models.encode_pixels(a, x) is x and models.decode_latents(a, 3 * x).abs().max() <= 1


def test_digits_save_load_roundtrip(tmp_path):
    a = models.build_model("digits")
    _perturb(a.unet)  # a "trained" model, not the seeded init
    models.save_model(a, tmp_path / "m")
    b = models.build_model("digits", str(tmp_path / "m"))
    x, t, emb = _inputs()
    with torch.no_grad():
        assert torch.equal(models.unet_forward(a, a.unet, x, t, emb), models.unet_forward(b, b.unet, x, t, emb))
    assert torch.equal(models.encode_prompts(a, ["seven"]), models.encode_prompts(b, ["seven"]))
    assert b.scheduler_config["prediction_type"] == "epsilon"
    with pytest.raises(FileNotFoundError, match="text_encoder/"):
        shutil.rmtree(tmp_path / "m" / "text_encoder")
        models.build_model("digits", str(tmp_path / "m"))


def test_lora_trains_only_adapter_and_disabled_is_base(tmp_path):
    base = models.build_model("digits")
    lora = models.build_model("digits", lora_rank=4)
    names = [n for n, p in lora.unet.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and ".default." in n for n in names)
    assert names == list(lora.trainable_state_dict())
    x, t, emb = _inputs()
    f = lambda bnd: models.unet_forward(bnd, bnd.unet, x, t, emb)
    with torch.no_grad():
        ref = f(base)
        assert torch.allclose(f(lora), ref, atol=1e-6)  # B = 0 at init: LoRA starts at the base model
        _perturb(lora.unet, only=lambda n: "lora_B" in n)
        assert not torch.allclose(f(lora), ref, atol=1e-4)
        lora.unet.disable_adapters()
        assert torch.equal(f(lora), ref)  # adapter off: exactly the base model
        lora.unet.enable_adapters()
        trained = f(lora)
    # save_model merges the adapter into a plain UNet
    models.save_model(lora, tmp_path / "merged")
    merged = models.build_model("digits", str(tmp_path / "merged"))
    assert not merged.lora and not any("lora" in n for n, _ in merged.unet.named_parameters())
    with torch.no_grad():
        assert torch.allclose(f(merged), trained, atol=1e-5)


def test_gradient_checkpointing_same_gradients():
    x, t, emb = _inputs()
    grads = []
    for gc in (False, True):
        b = models.build_model("digits", gradient_checkpointing=gc)
        assert b.unet.is_gradient_checkpointing == gc
        models.unet_forward(b, b.unet, x, t, emb).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in b.trainable_parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ----------------------------------------------------------------------------- sd15 / animatediff

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return sd15.write_tiny(str(root / "sd15")), animatediff.write_tiny_motion_adapter(str(root / "motion"))


def test_tiny_sd15_loads_like_a_release(tiny_dirs, tmp_path):
    from diffusers import StableDiffusionPipeline
    sd_dir, _ = tiny_dirs
    # diffusers' own loader accepts the directory, and ours loads the same weights
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True, safety_checker=None)
    # the release's tokenizer/ has vocab.json + merges.txt only: load that variant too
    release = tmp_path / "release"
    shutil.copytree(sd_dir, release)
    (release / "tokenizer" / "tokenizer.json").unlink()
    b = models.build_model("sd15", str(release))
    ours, theirs = b.unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert b.tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]
    assert b.scheduler_config["_class_name"] == "PNDMScheduler" and b.scheduler_config["steps_offset"] == 1
    assert b.vae is not None and not any(p.requires_grad for p in b.vae.parameters())
    assert torch.equal(models.encode_prompts(b, ["a cat"]), pipe.encode_prompt("a cat", "cpu", 1, False)[0])

    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = models.encode_pixels(b, x, generator=torch.Generator().manual_seed(0))
    expect = b.vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0)) * b.vae.config.scaling_factor
    assert z.shape == (2, 4, 8, 8) and torch.allclose(z, expect)  # the release's factor 8
    img = models.decode_latents(b, z)
    assert img.shape == x.shape and img.abs().max() <= 1
    # what save_model writes (LoRA merged) is again a directory diffusers' pipeline loads
    lora = models.build_model("sd15", sd_dir, lora_rank=2)
    models.save_model(lora, tmp_path / "saved")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", local_files_only=True)
    assert type(again.unet).__name__ == "UNet2DConditionModel" and again.vae is not None


def test_missing_or_partial_sd15_gives_one_clear_message(tiny_dirs, tmp_path):
    sd_dir, _ = tiny_dirs
    partial = tmp_path / "partial"
    shutil.copytree(sd_dir, partial)
    shutil.rmtree(partial / "unet")
    with pytest.raises(FileNotFoundError) as e:
        models.build_model("sd15", str(partial))
    msg = str(e.value)
    assert "missing unet/" in msg and "model_index.json" in msg and "huggingface-cli download" in msg
    assert e.value.__cause__ is None  # ours, not a re-raised library traceback
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.build_model("sd15", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="Motion adapter"):
        models.build_model("animatediff", sd_dir, motion_adapter_path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="family"):
        models.build_model("sdxxl")


def test_animatediff_motion_modules_and_frames(tiny_dirs):
    sd_dir, motion_dir = tiny_dirs
    b = models.build_model("animatediff", sd_dir, motion_adapter_path=motion_dir, num_frames=3)
    assert type(b.unet).__name__ == "UNetMotionModel" and b.num_frames == 3
    trainable = {n for n, p in b.unet.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in b.unet.named_parameters() if "motion_modules" in n} and trainable
    assert set(b.trainable_state_dict()) == trainable

    g = torch.Generator().manual_seed(0)
    z, emb = torch.randn(2, 4, 3, 8, 8, generator=g), models.encode_prompts(b, ["a red ball", "a blue cube"])
    t = torch.tensor([100, 700])
    with torch.no_grad():
        both = models.unet_forward(b, b.unet, z, t, emb)  # (2,4,3,8,8)
        # each video must see its own prompt on every frame: batching equals one-at-a-time
        one = torch.cat([models.unet_forward(b, b.unet, z[i:i + 1], t[i:i + 1], emb[i:i + 1]) for i in range(2)])
    assert both.shape == z.shape and torch.allclose(both, one, atol=1e-5)

    lora = models.build_model("animatediff", sd_dir, motion_adapter_path=motion_dir, lora_rank=2)
    assert all("lora_" in n for n, p in lora.unet.named_parameters() if p.requires_grad)

    video = torch.rand(1, 3, 2, 64, 64) * 2 - 1
    lat = models.encode_pixels(b, video, generator=torch.Generator().manual_seed(0))
    assert lat.shape == (1, 4, 2, 8, 8)
    frames = models.decode_latents(b, lat)
    assert frames.shape == video.shape
    assert torch.allclose(frames[:, :, 1], models.decode_latents(b, lat[:, :, 1]), atol=1e-5)  # per frame


def test_the_vae_factor_8_check_fires_on_the_sd15_stand_in(tiny_dirs, tmp_path, capsys):
    """The stand-in keeps the release's VAE factor 8 (4 blocks, 3 downsamplings), so the check that
    a resolution is a multiple of it is exercised: 20 px is refused in one line (exit 2), 24 runs."""
    sd_dir, _ = tiny_dirs
    b = models.build_model("sd15", sd_dir)
    assert models.vae_scale_factor(b) == 8 and models.latent_shape(b, 24) == (4, 3, 3)
    with pytest.raises(ValueError, match="resolution 20 must be a multiple of the VAE's factor 8"):
        models.latent_shape(b, 20)
    import train
    from test_train import _write_pickapic
    _write_pickapic(tmp_path / "pickapic")
    argv = ["--config=sd15_pickapic", f"--model_path={sd_dir}", f"--data_path={tmp_path / 'pickapic'}", "--method=sft",
            "--max_steps=1", "--resolution=20", "--mixed_precision=no", "--sample_every=0", f"--out_dir={tmp_path / 'run'}"]
    assert train.main(argv) == 2
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert line == "error: resolution 20 must be a multiple of the VAE's factor 8", line
