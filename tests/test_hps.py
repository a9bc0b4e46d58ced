"""HPSv2 from an open_clip state dict, checked against an open_clip-structured forward written
here in plain torch from the architecture (nn.MultiheadAttention blocks on (L,N,D), class token,
ln_pre/ln_post, x @ proj, causal text tower read at argmax(token) with zero padding): it shares
no code or key mapping with hps.openclip_to_transformers. A tiny random state dict in the real
key layout stands in for HPS_v2.1_compressed.pt."""
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import evaluate
from scoring import hps, scorers
from models import common

VW, TW, PATCH, IMG, LAYERS, HEADS, PROJ, CTX, VOCAB = 32, 32, 8, 32, 2, (4, 2), 16, 77, 49408


def _tiny_openclip_state(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.2: torch.randn(*s, generator=g) * scale  # noqa: E731
    sd = {"visual.conv1.weight": r(VW, 3, PATCH, PATCH), "visual.class_embedding": r(VW),
          "visual.positional_embedding": r((IMG // PATCH) ** 2 + 1, VW), "visual.proj": r(VW, PROJ),
          "token_embedding.weight": r(VOCAB, TW), "positional_embedding": r(CTX, TW), "text_projection": r(TW, PROJ),
          "logit_scale": torch.tensor(4.6052)}
    for ln, w in (("visual.ln_pre", VW), ("visual.ln_post", VW), ("ln_final", TW)):
        sd[f"{ln}.weight"], sd[f"{ln}.bias"] = 1 + r(w), r(w)
    for pre, w in (("visual.transformer", VW), ("transformer", TW)):
        for i in range(LAYERS):
            b = f"{pre}.resblocks.{i}"
            sd |= {f"{b}.ln_1.weight": 1 + r(w), f"{b}.ln_1.bias": r(w), f"{b}.ln_2.weight": 1 + r(w),
                   f"{b}.ln_2.bias": r(w), f"{b}.attn.in_proj_weight": r(3 * w, w), f"{b}.attn.in_proj_bias": r(3 * w),
                   f"{b}.attn.out_proj.weight": r(w, w), f"{b}.attn.out_proj.bias": r(w),
                   f"{b}.mlp.c_fc.weight": r(4 * w, w), f"{b}.mlp.c_fc.bias": r(4 * w),
                   f"{b}.mlp.c_proj.weight": r(w, 4 * w), f"{b}.mlp.c_proj.bias": r(w)}
    return sd


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])


def _resblocks(x, sd, prefix, heads, mask=None):
    """open_clip Transformer on (L,N,D): x + attn(ln_1 x); x + c_proj(gelu(c_fc(ln_2 x)))."""
    for i in range(LAYERS):
        b = f"{prefix}.resblocks.{i}"
        attn = nn.MultiheadAttention(x.shape[-1], heads)
        attn.load_state_dict({k: sd[f"{b}.attn.{k}"] for k in ("in_proj_weight", "in_proj_bias",
                                                                 "out_proj.weight", "out_proj.bias")})
        y = _ln(x, sd, f"{b}.ln_1")
        x = x + attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        y = _ln(x, sd, f"{b}.ln_2")
        x = x + F.linear(F.gelu(F.linear(y, sd[f"{b}.mlp.c_fc.weight"], sd[f"{b}.mlp.c_fc.bias"])),
                         sd[f"{b}.mlp.c_proj.weight"], sd[f"{b}.mlp.c_proj.bias"])
    return x


def _reference_image(px, sd):
    x = F.conv2d(px, sd["visual.conv1.weight"], stride=PATCH)  # (N,W,g,g)
    x = x.flatten(2).permute(0, 2, 1)  # (N,g*g,W)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd["visual.positional_embedding"]
    x = _resblocks(_ln(x, sd, "visual.ln_pre").permute(1, 0, 2), sd, "visual.transformer", HEADS[0]).permute(1, 0, 2)
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def _reference_text(tokens, sd):
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]  # (N,CTX,W)
    mask = torch.full((CTX, CTX), float("-inf")).triu(1)  # causal
    x = _resblocks(x.permute(1, 0, 2), sd, "transformer", HEADS[1], mask).permute(1, 0, 2)
    x = _ln(x, sd, "ln_final")
    return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ sd["text_projection"]  # EOT has the largest id


def _openclip_tokens(prompts):
    """open_clip's layout: <start> ids <end>, then zeros to 77 (not the eos padding of HF)."""
    ids = common.clip_tokenizer()(list(prompts))["input_ids"]
    out = torch.zeros(len(ids), CTX, dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, :len(row)] = torch.tensor(row)
    return out


PROMPTS = ["a red cube on a table", "a dog", "an oil painting of a lighthouse at night, highly detailed"]


def _images(n, size=(40, 48)):
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def test_hpsv2_matches_an_openclip_structured_forward(tmp_path):
    sd = _tiny_openclip_state()
    torch.save({"state_dict": sd, "epoch": 1}, tmp_path / "HPS_v2.1_compressed.pt")
    scorer = hps.HPSv2Scorer(tmp_path / "HPS_v2.1_compressed.pt", heads=HEADS)
    imgs = _images(3)
    got = scorer(imgs, PROMPTS)
    with torch.no_grad():
        img = _reference_image(hps.hps_pixels(imgs, IMG), sd)
        txt = _reference_text(_openclip_tokens(PROMPTS), sd)
    expected = 100 * F.cosine_similarity(img, txt, dim=-1)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)
    assert np.ptp(got) > 1.0  # the scores differ per pair: the check is not vacuous
    assert scorer.model.logit_scale.item() == pytest.approx(4.6052)


def test_hps_pixels_pad_the_short_side_like_hpsv2():
    img = Image.fromarray(np.full((20, 40, 3), 255, np.uint8))  # 2:1 white, H=20, W=40
    x = hps.hps_pixels([img], 32)[0]  # resized to 32x16, centred, black above and below
    black = (0 - torch.tensor(hps.OPENAI_MEAN)) / torch.tensor(hps.OPENAI_STD)
    white = (1 - torch.tensor(hps.OPENAI_MEAN)) / torch.tensor(hps.OPENAI_STD)
    assert torch.allclose(x[:, :8], black.view(3, 1, 1).expand(3, 8, 32), atol=1e-6)
    assert torch.allclose(x[:, 24:], black.view(3, 1, 1).expand(3, 8, 32), atol=1e-6)
    assert torch.allclose(x[:, 8:24], white.view(3, 1, 1).expand(3, 16, 32), atol=1e-2)


def test_hpsv2_bad_checkpoints_are_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="HPSv2 checkpoint.*HPS_v2.1_compressed.pt"):
        hps.HPSv2Scorer(tmp_path / "missing.pt")
    sd = _tiny_openclip_state()
    torch.save({"state_dict": {k: v for k, v in sd.items() if k != "visual.proj"}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="missing visual.proj"):
        hps.HPSv2Scorer(tmp_path / "partial.pt", heads=HEADS)
    torch.save({"state_dict": {**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(VW)}}, tmp_path / "ls.pt")
    with pytest.raises(ValueError, match="no place in a transformers CLIPModel.*ls_1"):
        hps.HPSv2Scorer(tmp_path / "ls.pt", heads=HEADS)


def test_score_cli_runs_hpsv2_and_says_why_imagereward_cannot(tmp_path, monkeypatch, capsys):
    """`evaluate.py score --hpsv2 --imagereward`: HPSv2 per image as hps.HPSv2Scorer gives it;
    ImageReward (not importable here, as under transformers 5) is one stderr line and a listed skip."""
    torch.save({"state_dict": _tiny_openclip_state()}, tmp_path / "hps.pt")
    (tmp_path / "gen" / "images").mkdir(parents=True)
    imgs = _images(2)
    for i, im in enumerate(imgs):
        im.save(tmp_path / "gen" / "images" / f"{i:05d}.png")
    items = [{"file": f"images/{i:05d}.png", "prompt": PROMPTS[i], "seed": i} for i in range(2)]
    (tmp_path / "gen" / "manifest.json").write_text(json.dumps({"kind": "image", "items": items}))
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # `import ImageReward` raises ImportError
    evaluate.main(["score", "--generated", str(tmp_path / "gen"), "--hpsv2", str(tmp_path / "hps.pt"),
                   "--imagereward", str(tmp_path / "ImageReward.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("ImageReward not scored")] == [err[-1]]
    assert "transformers 5" in err[-1] and "apply_chunking_to_forward" in err[-1]
    scores = json.loads((tmp_path / "gen" / "scores.json").read_text())
    assert set(scores["skipped"]) == {"imagereward"} and set(scores["mean"]) == {"hpsv2"}
    expected = hps.HPSv2Scorer(tmp_path / "hps.pt")(imgs, PROMPTS[:2])
    assert [r["hpsv2"] for r in scores["per_item"]] == pytest.approx(expected.tolist(), rel=1e-5)
    assert scorers.HPSv2Scorer is hps.HPSv2Scorer
