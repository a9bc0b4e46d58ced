"""Evaluating a trained model: the digits report, and generation + scoring at real scale.

    python evaluate.py report RUN_DIR                # judge a digits run against its base
    python evaluate.py generate --family sd15 --checkpoint DIR --prompts FILE --out DIR [--lora PATH]
        DIR: a pipeline, a run's final/ (full or LoRA) or checkpoints/step_N (on the run's base model)
    python evaluate.py score --generated DIR [--clip DIR] [--pickscore DIR] [--aesthetic-head FILE]
        [--hpsv2 HPS_v2.1_compressed.pt] [--reference DIR --clip-fid CLIP_DIR] ...

The digits judge and its metrics are defined in digits.py; the model-based real-scale scorers and
the metric math live in scoring/scorers.py. The table over many methods and seeds: research/benchmark.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

import digits
import digits.judge
from infra import export
import models


# ----------------------------------------------------------------------------- digits

def report_digits_run(run_dir, n_per_condition: int = 100, num_inference_steps: int = 20, seed: int = 0) -> dict:
    """Judge a finished digits run against its base model: writes run_dir/eval.json and returns
    {"base": metrics, "final": metrics} (same prompts and noise for both)."""
    run_dir = Path(run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    judge = digits.judge.DigitsJudge.from_splits()
    base = saved.get("model_path") or digits.ensure_base(saved["cache_dir"], saved["digits_base_steps"],
                                                         saved["digits_corrupt"])
    res = {"judge_real_accuracy": judge.real_accuracy}
    rf = digits.judge.second_judge()
    prompts, labels = digits.judge.digit_prompts(digits.TRAIN_TEMPLATES, n_per_condition)
    bundles = {}
    for name, path in (("base", base), ("final", run_dir / "final")):
        bundle = bundles[name] = models.build_model("digits", str(path))
        res[name] = digits.judge.evaluate_model(bundle, judge, seed=seed, n_per_condition=n_per_condition,
                                          num_inference_steps=num_inference_steps)
        x = digits.judge.generate_digits(bundle, prompts, num_inference_steps=num_inference_steps, seed=seed)
        res[name]["id_cfg/accuracy_rf"] = float((rf(x) == labels).mean())  # the independent check
    (run_dir / "eval.json").write_text(json.dumps(res, indent=1))
    compare_picture(run_dir / PICTURE, bundles, {k: res[k]["id_cfg/accuracy"] for k in bundles}, saved["method"],
                    num_inference_steps=num_inference_steps, seed=seed)
    export.write_model_card(run_dir)  # the card in final/ now carries these numbers
    rows = ["condition              metric      base    final"]
    for key in res["final"]:
        rows.append(f"{key.split('/')[0]:<22} {key.split('/')[1]:<10} {res['base'][key]:7.3f}  {res['final'][key]:7.3f}")
    print(f"judge (accuracy {judge.real_accuracy:.3f} on real held-out digits) on {n_per_condition} "
          f"generated digits per condition; id/ood = training/held-out caption templates, "
          f"cfg/nocfg = guidance 3 / none; accuracy_rf = an independent RandomForest judge:\n" + "\n".join(rows))
    return res


PICTURE = "base_vs_aligned.png"  # what a digits run shows a person: train.py prints its path last


def compare_picture(path: Path, bundles: dict, accuracy: dict, method: str, *, per_digit: int = 3,
                    num_inference_steps: int = 20, seed: int = 0, cell: int = 40) -> Path:
    """One labelled picture: a column per prompted digit ("a handwritten digit three", the first
    training template, guidance 3), ``per_digit`` samples of the base model above the same noise
    through the aligned one, each block under a caption row with the judge's accuracy."""
    from PIL import Image, ImageDraw
    from infra.runtime import _font
    words = digits.DIGIT_WORDS
    prompts = [digits.digit_caption(d, digits.TRAIN_TEMPLATES[0]) for _ in range(per_digit) for d in range(len(words))]
    left, head, caption = 70, 18, 20
    width = left + cell * len(words)
    height = head + len(bundles) * (caption + cell * per_digit + 6)
    img = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(img), _font(11)
    draw.text((4, 3), "prompt:", fill="black", font=font)
    for d, word in enumerate(words):
        draw.text((left + d * cell + 3, 3), word, fill="black", font=font)
    y = head
    for name, bundle in bundles.items():
        label = "base" if name == "base" else f"after {method}"
        draw.text((4, y + 4), f"{label}: the judge reads the prompted digit in {accuracy[name]:.0%} of its samples",
                  fill="black", font=font)
        y += caption
        x = digits.judge.generate_digits(bundle, prompts, num_inference_steps=num_inference_steps, seed=seed)
        px = ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()  # (N,8,8)
        for i, a in enumerate(px):
            row, d = divmod(i, len(words))
            im = Image.fromarray(a).resize((cell - 4, cell - 4), Image.NEAREST).convert("RGB")
            img.paste(im, (left + d * cell + 2, y + row * cell + 2))
        draw.text((4, y + 4), label, fill="black", font=font)
        y += cell * per_digit + 6
    img.save(path)
    return Path(path)


# ----------------------------------------------------------------------------- real-scale generation

def pipeline_from_bundle(bundle):
    """Wrap a models.Bundle (sd15 / animatediff) in diffusers' own pipeline, DDIM sampler."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, StableDiffusionPipeline
    sched = DDIMScheduler.from_config(bundle.scheduler_config)
    parts = dict(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet, scheduler=sched)
    if bundle.family == "animatediff":
        return AnimateDiffPipeline(**parts, motion_adapter=None)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def lora_weights(path) -> dict:
    """LoRA weights in diffusers' format (keys ``unet.*lora*``) from a pytorch_lora_weights
    .safetensors file, a folder holding one (a LoRA run's final/), or a LoRA run's
    checkpoints/step_N (trainable.safetensors, converted with export.lora_layers). Raises
    ValueError naming the file when it holds no LoRA keys (diffusers would load nothing, silently)."""
    path = Path(path)
    f = path if path.is_file() else next((path / n for n in (export.LORA_FILE, "trainable.safetensors")
                                          if (path / n).is_file()), None)
    if f is None:
        raise FileNotFoundError(f"no LoRA weights at {path}: expected {export.LORA_FILE} or a checkpoints/step_N "
                                f"directory (trainable.safetensors)")
    sd = load_file(str(f))
    if f.name == "trainable.safetensors":
        try:
            return {f"unet.{k}": v for k, v in export.lora_layers(sd).items()}
        except ValueError:
            sd = {}
    lora = {k: v for k, v in sd.items() if "lora" in k}
    if not lora:
        raise ValueError(f"no LoRA keys in {f}: not a LoRA adapter (a full fine-tune's checkpoint loads with "
                         f"--checkpoint instead)")
    return lora


def apply_lora(pipe, path) -> None:
    """Load LoRA weights (any form ``lora_weights`` reads) into ``pipe`` and check they landed."""
    pipe.load_lora_weights(lora_weights(path), adapter_name="sspo")
    if not any(pipe.get_list_adapters().values()):
        raise ValueError(f"the LoRA weights at {path} match no layer of this pipeline's UNet")


def load_pipeline(family: str, checkpoint, *, lora=None, motion_adapter=None, scheduler: str = "ddim",
                  device: str = "cpu", dtype: str = "float32", base=None):
    """A diffusers pipeline from a local checkpoint: a full pipeline directory (model_index.json),
    this project's save_model layout (unet/, text_encoder/, tokenizer/, scheduler/, vae/; loaded
    with models.build_model), or a run's LoRA final/ or checkpoints/step_N on top of ``base``
    (default: the run's model_path in config.json); plus optional LoRA weights (``lora``)."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, StableDiffusionPipeline
    ckpt = Path(checkpoint)
    run_ckpt = (ckpt / "trainable.safetensors").is_file() or (ckpt / export.LORA_FILE).is_file()
    if run_ckpt and not (ckpt / "model_index.json").exists():
        cfg = export.run_config(ckpt) if base is None or (family == "animatediff" and not motion_adapter) else {}
        base = base or cfg.get("model_path") or None
        motion_adapter = motion_adapter or cfg.get("motion_adapter_path") or None
        if not base:
            raise ValueError(f"{ckpt} holds only trained weights; pass --base <the base model's directory>")
        weights = load_file(str(ckpt / "trainable.safetensors")) if (ckpt / "trainable.safetensors").is_file() else {}
        if weights and not any("lora_" in k for k in weights):  # full / motion-module fine-tune
            bundle = models.build_model(family, path=str(base), motion_adapter_path=motion_adapter)
            models.load_trainable(bundle, weights)
            pipe = pipeline_from_bundle(bundle)
        else:
            pipe = load_pipeline(family, base, motion_adapter=motion_adapter, scheduler="saved")
            apply_lora(pipe, ckpt)
    elif (ckpt / "model_index.json").exists():
        if family == "animatediff":
            adapter = MotionAdapter.from_pretrained(motion_adapter, local_files_only=True) if motion_adapter else None
            pipe = AnimateDiffPipeline.from_pretrained(ckpt, motion_adapter=adapter, local_files_only=True)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(ckpt, safety_checker=None, requires_safety_checker=False,
                                                           local_files_only=True)
    elif (ckpt / "unet").is_dir():
        pipe = pipeline_from_bundle(models.build_model(family, path=str(ckpt), motion_adapter_path=motion_adapter))
    else:
        raise FileNotFoundError(f"no checkpoint at {ckpt}: expected a diffusers pipeline directory (model_index.json) "
                                "or a save_model directory (unet/, text_encoder/, tokenizer/, scheduler/, vae/)")
    if lora:
        apply_lora(pipe, lora)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, getattr(torch, dtype))  # noise still comes from CPU generators: same images on any device


def generate(pipe, prompts, out: Path, *, seed: int = 0, batch_size: int = 4, num_inference_steps: int = 50,
             guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
             num_frames: int = 16, fps: int = 8) -> Path:
    """Generate one image (PNG) or video (GIF) per prompt into out/, prompt i with seed + i (so the
    result does not depend on batch_size), and write out/manifest.json. Returns the manifest path."""
    from diffusers import AnimateDiffPipeline
    from diffusers.utils import export_to_gif
    video = isinstance(pipe, AnimateDiffPipeline)
    (out / ("videos" if video else "images")).mkdir(parents=True, exist_ok=True)
    items = []
    for i in progress(range(0, len(prompts), batch_size), desc="generate", unit="batch"):
        batch = list(prompts[i:i + batch_size])
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(batch))]
        kw = dict(prompt=batch, generator=gens, num_inference_steps=num_inference_steps,
                  guidance_scale=guidance_scale, height=height, width=width)
        if video:
            results = pipe(**kw, num_frames=num_frames).frames  # list of lists of PIL frames
        else:
            results = pipe(**kw).images
        for j, (prompt, res) in enumerate(zip(batch, results)):
            name = f"videos/{i + j:05d}.gif" if video else f"images/{i + j:05d}.png"
            export_to_gif(res, str(out / name), fps=fps) if video else res.save(out / name)
            items.append({"file": name, "prompt": prompt, "seed": seed + i + j})
    manifest = {"kind": "video" if video else "image", "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale, "items": items}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out / "manifest.json"


# ----------------------------------------------------------------------------- every family: the one sampler

FAMILIES = ("digits", "sd15", "animatediff", "sdxl", "cogvideox", "wan")
PIPELINE_PATH = ("sd15", "animatediff")  # generated by their diffusers pipelines (load_pipeline)


def family_of(checkpoint) -> str:
    """The family of a checkpoint: its run's config.json (final/, checkpoints/step_N), else the
    model_index.json of a pipeline directory. Raises ValueError when neither says."""
    import config as config_mod
    try:
        return export.run_config(checkpoint)["model"]
    except FileNotFoundError:
        pass
    try:
        return config_mod.infer_family(str(checkpoint))
    except ValueError:
        raise ValueError(f"cannot tell the family of {checkpoint}: no run config.json above it and no "
                         f"model_index.json naming a pipeline; pass --family {'|'.join(FAMILIES)}") from None


def load_bundle(family: str, checkpoint, *, base=None, motion_adapter=None) -> models.Bundle:
    """A models.Bundle from a full model directory (a run's full final/, a pipeline), a run's
    checkpoints/step_N (full or LoRA, on the run's base or ``base``), or a LoRA run's final/
    (the run's newest checkpoint, which final/ was written from)."""
    ckpt = Path(checkpoint)
    if (ckpt / export.LORA_FILE).is_file() and not (ckpt / "trainable.safetensors").is_file():
        from infra import checkpoints
        step = checkpoints.latest_step(ckpt.parent)
        if step is None:
            raise ValueError(f"{ckpt} holds a LoRA adapter but its run keeps no checkpoint to read it from; "
                             f"pass a checkpoints/step_N")
        ckpt = ckpt.parent / "checkpoints" / f"step_{step:06d}"
    if not (ckpt / "trainable.safetensors").is_file():
        return models.build_model(family, path=str(ckpt), motion_adapter_path=motion_adapter)
    cfg = export.run_config(ckpt)
    from infra import builders
    import config as config_mod
    run_cfg = config_mod.Config(**{k: v for k, v in cfg.items() if k in config_mod.Config.__dataclass_fields__})
    run_cfg.model, run_cfg.gradient_checkpointing = family, False
    run_cfg.model_path = str(base) if base else run_cfg.model_path
    run_cfg.motion_adapter_path = motion_adapter or run_cfg.motion_adapter_path
    bundle = builders.build_bundle(run_cfg)
    models.load_trainable(bundle, load_file(str(ckpt / "trainable.safetensors")))
    return bundle


@torch.no_grad()
def generate_with_bundle(bundle, prompts, out: Path, *, seed: int = 0, batch_size: int = 4,
                         num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                         width: int | None = None, num_frames: int = 16, fps: int = 8, scheduler: str = "ddim") -> Path:
    """As ``generate``, for any family, through the training loop's sampler (models.sampling):
    prompt i with noise from seed + i; images as PNG, videos as a folder of PNG frames plus a GIF."""
    from diffusers.utils import export_to_gif
    from PIL import Image
    from models import sampling
    h, w = height or width or 512, width or height or 512  # digits: its own 8x8
    shape = models.latent_shape(bundle, h if h == w else (h, w), num_frames)
    video = len(shape) == 4
    (out / ("videos" if video else "images")).mkdir(parents=True, exist_ok=True)
    items = []
    for i in progress(range(0, len(prompts), batch_size), desc="generate", unit="batch"):
        batch = list(prompts[i:i + batch_size])
        z = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + i + j))
                       for j in range(len(batch))])
        lat = sampling.sample_with_policy(bundle, batch, latent_shape=shape, latents=z, scheduler=scheduler,
                                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        px = models.decode_latents(bundle, lat).float().clamp(-1, 1).cpu()
        arr = ((px + 1) * 127.5).round().byte()
        for j, prompt in enumerate(batch):
            k = i + j
            if video:  # (C,F,H,W)
                frames = [Image.fromarray(f.permute(1, 2, 0).squeeze(-1).numpy()) for f in arr[j].unbind(1)]
                (out / "videos" / f"{k:05d}").mkdir(exist_ok=True)
                for n, f in enumerate(frames):
                    f.save(out / "videos" / f"{k:05d}" / f"{n:04d}.png")
                name = f"videos/{k:05d}.gif"
                export_to_gif(frames, str(out / name), fps=fps)
            else:
                name = f"images/{k:05d}.png"
                Image.fromarray(arr[j].permute(1, 2, 0).squeeze(-1).numpy()).save(out / name)
            items.append({"file": name, "prompt": prompt, "seed": seed + k})
    manifest = {"kind": "video" if video else "image", "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale, "family": bundle.family, "items": items}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out / "manifest.json"


def progress(iterable, **kw):
    """tqdm on a terminal; piped (CI, nohup), a plain line per step instead."""
    import sys
    if sys.stderr.isatty():
        return tqdm(iterable, **kw)
    items = list(iterable)

    def lines():
        for n, x in enumerate(items, 1):
            yield x
            print(f"{kw.get('desc', 'progress')}: {n}/{len(items)} {kw.get('unit', 'it')}", flush=True)
    return lines()


SCORER_FLAGS = ("clip", "pickscore", "pickscore_processor", "aesthetic_clip", "aesthetic_head", "hpsv2",
                "imagereward", "reference", "clip_fid_model", "i3d")


def check_score_args(args) -> None:
    """One-line refusals of a score command that would compute nothing or crash on a missing path."""
    for key in SCORER_FLAGS + ("generated",):  # (ImageReward is skipped with its own reason: see --help)
        v = getattr(args, key, None) if key != "imagereward" else None
        if v and not Path(v).exists():
            raise ValueError(f"--{key.replace('_', '-')} {v}: no such file or directory")
    if not (Path(args.generated) / "manifest.json").is_file():
        raise ValueError(f"--generated {args.generated}: no manifest.json (expected an `evaluate.py generate` output)")
    if not any(getattr(args, k) for k in ("clip", "pickscore", "aesthetic_head", "hpsv2", "imagereward",
                                          "clip_fid_model", "i3d")) and not args.reference:
        raise ValueError("no scorer given: pass one or more of --clip, --pickscore, --aesthetic-head, --hpsv2, "
                         "--imagereward, --reference with --clip-fid or --i3d")
    kind = json.loads((Path(args.generated) / "manifest.json").read_text()).get("kind")
    if args.reference and not (args.clip_fid_model or args.i3d or kind == "video"):
        raise ValueError("--reference is compared only by --clip-fid (and --i3d / PSNR for videos): pass --clip-fid CLIP_DIR")


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate images/videos from a trained checkpoint")
    g.add_argument("--family", choices=FAMILIES, help="default: the run's config.json, or the "
                   "checkpoint's model_index.json")
    g.add_argument("--checkpoint", required=True, help="pipeline dir (model_index.json), a run's final/, or a "
                   "run's checkpoints/step_N (loaded on the run's base model, or --base)")
    g.add_argument("--base", help="base model dir for a LoRA final/ or a checkpoints/step_N (default: the run's model_path)")
    g.add_argument("--lora", help="LoRA weights on top of --checkpoint: pytorch_lora_weights.safetensors, "
                   "a folder with it, or a LoRA run's checkpoints/step_N")
    g.add_argument("--motion-adapter", help="local MotionAdapter dir (animatediff)")
    g.add_argument("--prompts", required=True, help="prompt file or folder (csv/tsv/json/jsonl/parquet/txt)")
    g.add_argument("--column", help="caption column (default: first of caption/prompt/Prompt/text)")
    g.add_argument("--limit", type=int, help="use only the first N prompts")
    g.add_argument("--out", required=True)
    g.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--steps", type=int, default=50, help="DDIM steps")
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--num-frames", type=int, default=16)
    g.add_argument("--scheduler", choices=["ddim", "saved"], default="ddim", help="sampler: DDIM or the checkpoint's own")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:1 ...")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    r = sub.add_parser("report", help="judge a finished digits run against its base model")
    r.add_argument("run_dir", help="output dir of a digits train.py run")
    s = sub.add_parser("score", help="score a `generate` output with local scorer weights")
    s.add_argument("--generated", required=True, help="output dir of `generate`")
    s.add_argument("--clip", help="local CLIP dir for CLIP score (e.g. openai/clip-vit-large-patch14)")
    s.add_argument("--pickscore", help="local PickScore_v1 model dir")
    s.add_argument("--pickscore-processor", help="local processor dir (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    s.add_argument("--aesthetic-clip", help="local CLIP ViT-L/14 dir (default: --clip)")
    s.add_argument("--aesthetic-head", help="LAION aesthetic MLP weights (.pth/.safetensors)")
    s.add_argument("--hpsv2", help="local HPSv2 checkpoint, HPS_v2.1_compressed.pt (open_clip ViT-H-14 weights; "
                   "scored through transformers, no hpsv2/open_clip package); reported as 100*cos like the papers")
    s.add_argument("--imagereward", help="local ImageReward.pt (needs the image-reward package, which does not "
                   "import under transformers 5: then skipped with a one-line reason)")
    s.add_argument("--reference", help="real images/videos named like the generated files (PSNR, CLIP-FID, FVD)")
    s.add_argument("--clip-fid", "--fid-clip", dest="clip_fid_model", help="local CLIP dir whose image embeddings "
                   "define CLIP-FID (not Inception FID: not comparable with published FID numbers)")
    s.add_argument("--i3d", help="local TorchScript I3D (FVD)")
    s.add_argument("--out", help="scores JSON (default: <generated>/scores.json)")
    args = p.parse_args(argv)
    if args.cmd == "report":
        report_digits_run(args.run_dir)
    elif args.cmd == "generate":
        from scoring.prompts import load_prompts
        prompts = load_prompts(args.prompts, args.column, args.limit)
        try:
            family = args.family or family_of(args.checkpoint)
            if family in PIPELINE_PATH or args.lora:
                pipe = load_pipeline(family, args.checkpoint, lora=args.lora, motion_adapter=args.motion_adapter,
                                     scheduler=args.scheduler, device=args.device, dtype=args.dtype, base=args.base)
            else:
                bundle = load_bundle(family, args.checkpoint, base=args.base, motion_adapter=args.motion_adapter)
                bundle.unet.to(args.device)
                for m in (bundle.text_encoder, bundle.text_encoder_2, bundle.vae):
                    if m is not None:
                        m.to(args.device)
        except (ValueError, FileNotFoundError) as e:
            p.exit(2, f"error: {e}\n")
        kw = dict(seed=args.seed, batch_size=args.batch_size, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, height=args.height, width=args.width, num_frames=args.num_frames)
        if family in PIPELINE_PATH or args.lora:
            print(generate(pipe, prompts, Path(args.out), **kw))
        else:
            print(generate_with_bundle(bundle, prompts, Path(args.out), **kw))
    else:
        kw = {k: getattr(args, k) for k in ("clip", "pickscore", "pickscore_processor", "aesthetic_clip",
                                              "aesthetic_head", "hpsv2", "imagereward", "reference", "clip_fid_model", "i3d")}
        from scoring.scorers import score_generated
        try:
            check_score_args(args)
            scores = score_generated(args.generated, **kw)
        except (ValueError, OSError) as e:
            p.exit(2, f"error: {' '.join(str(e).split())}\n")
        out = Path(args.out or Path(args.generated) / "scores.json")
        out.write_text(json.dumps(scores, indent=1))
        print(json.dumps(scores["mean"], indent=1))
        if "clip_fid" in scores["mean"]:
            print(f"clip_fid is CLIP-FID (Frechet distance of {scores['clip_fid_model']} image embeddings), "
                  "not Inception FID: compare it only with CLIP-FID on the same CLIP model")


if __name__ == "__main__":
    main()
