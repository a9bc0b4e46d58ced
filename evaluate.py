"""Evaluation: the digits judge and results table, and generation + scoring at real scale.

    python evaluate.py table [--quick] [--seeds N] [--out results/]     # trains every method, writes table + plots
    python evaluate.py generate --family sd15 --checkpoint DIR --prompts FILE --out DIR [--lora PATH]
    python evaluate.py score --generated DIR [--clip DIR] [--pickscore DIR] [--aesthetic-head FILE] ...

The digits judge is independent of the training code: a scikit-learn classifier
(pixels -> PCA(32) -> RBF SVC, probabilities calibrated with 5-fold CV, sklearn
default hyperparameters, never tuned) fitted on the real digits of the pretrain + align splits.
Its feature space for the Frechet distance is that PCA projection, the space its SVC reads.
Metrics on N generated digits with prompted labels y (paper Table 1, digits edition):
  accuracy   = mean[judge class == y]       (prompt alignment)
  confidence = mean[p_judge(y | x)]
  frechet    = Frechet distance between generated and real eval digits in judge features.
Model-based real-scale scorers and the metric math live in scorers.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scorers import frechet_distance, gaussian_stats, psnr  # noqa: F401  (re-exported API)

DIGIT_SPLIT_SEED = 0  # the data split never changes with the training seed: eval digits stay held out


# ----------------------------------------------------------------------------- the digits judge

def _flat(x) -> np.ndarray:
    """(N,1,8,8) tensor/array in [-1,1] -> (N,64) float64, clipped to the image range."""
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    return np.clip(x.reshape(len(x), -1).astype(np.float64), -1, 1)


class DigitsJudge:
    """sklearn classifier on real digits; scores generated digits against prompted labels."""

    def __init__(self, x_train, y_train, x_ref, n_components: int = 32):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.decomposition import PCA
        from sklearn.pipeline import make_pipeline
        from sklearn.svm import SVC
        y_train = np.asarray(y_train)
        if set(np.unique(y_train)) != set(range(10)):
            raise ValueError(f"judge training labels must cover digits 0..9, got {sorted(set(y_train))}")
        # Raw pixels (all already in [-1,1]), not per-pixel standardisation: border pixels are
        # constant in real digits, and dividing by their ~0 spread turns any faint value a
        # generator puts there into a huge feature that decides the class on its own.
        self.clf = make_pipeline(PCA(n_components, random_state=0),
                                 CalibratedClassifierCV(SVC(), ensemble=False))
        self.clf.fit(_flat(x_train), y_train)
        self.ref_stats = gaussian_stats(self.features(x_ref))  # real eval digits

    @classmethod
    def from_splits(cls, splits: dict) -> "DigitsJudge":
        """Fit on pretrain + align (data.load_digits_splits layout); eval digits are the reference
        and give `self.real_accuracy`, the judge's own accuracy on held-out real digits."""
        x = torch.cat([splits["pretrain"][0], splits["align"][0]])
        y = torch.cat([splits["pretrain"][1], splits["align"][1]])
        judge = cls(x, y.numpy(), splits["eval"][0])
        judge.real_accuracy = judge.score(*splits["eval"])["accuracy"]
        return judge

    def features(self, x) -> np.ndarray:
        """(N,1,8,8) -> (N,32): the PCA features the SVC reads."""
        return self.clf[:-1].transform(_flat(x))

    def predict_proba(self, x) -> np.ndarray:
        return self.clf.predict_proba(_flat(x))  # (N,10), columns = digits 0..9

    def score(self, x, labels) -> dict:
        """accuracy, confidence (mean p of the prompted digit), frechet (vs real eval digits)."""
        labels = np.asarray(labels)
        p = self.predict_proba(x)
        return {"accuracy": float((p.argmax(1) == labels).mean()),
                "confidence": float(p[np.arange(len(labels)), labels].mean()),
                "frechet": frechet_distance(*gaussian_stats(self.features(x)), *self.ref_stats)}


# ----------------------------------------------------------------------------- digit generation

@torch.no_grad()
def generate_digits(bundle, prompts, *, guidance_scale: float = 3.0, num_inference_steps: int = 20,
                    seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """Sample digits (N,1,8,8) in [-1,1] with DDIM (eta 0) + classifier-free guidance (off when
    guidance_scale <= 1): replay.sample_losers run by the model itself, which equals
    StableDiffusionPipeline(output_type="latent") in pixel space. One generator seeded by `seed`
    draws all initial noise, so every method is judged on the same noise (common random
    numbers). Small batches: on CPU this UNet's cost per sample grows with batch beyond ~100."""
    from models import unet_forward
    from replay import sample_losers
    unet = bundle.unet
    was_training = unet.training
    unet.eval()
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    generator = torch.Generator().manual_seed(seed)
    model = lambda x, t, emb: unet_forward(bundle, unet, x, t, emb)  # noqa: E731
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        z = torch.randn((len(chunk), *shape), generator=generator)  # (B,1,8,8)
        out.append(sample_losers(bundle, model, chunk, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, latent_shape=shape, latents=z).clamp(-1, 1))
    unet.train(was_training)
    return torch.cat(out)


def digit_prompts(templates, n_per_condition: int) -> tuple[list[str], list[int]]:
    """About n_per_condition prompts, balanced over templates x digits 0..9, and their labels."""
    from data import DIGIT_WORDS, digit_caption
    k = max(1, -(-n_per_condition // (len(templates) * len(DIGIT_WORDS))))  # ceil
    labels = [d for _ in templates for d in range(len(DIGIT_WORDS)) for _ in range(k)]
    prompts = [digit_caption(d, t) for t in templates for d in range(len(DIGIT_WORDS)) for _ in range(k)]
    return prompts, labels


def evaluate_digits_model(bundle, judge, *, n_per_condition: int, num_inference_steps: int, seed: int,
                          guidance_scale: float = 3.0, conditions=("id_cfg", "id_nocfg", "ood_cfg", "ood_nocfg")) -> dict:
    """Judge metrics per condition: id = training caption templates (TRAIN_TEMPLATES), ood =
    held-out templates (HELDOUT_TEMPLATES); cfg = guidance `guidance_scale`, nocfg = none.
    Keys like "ood_nocfg/accuracy"."""
    from data import HELDOUT_TEMPLATES, TRAIN_TEMPLATES
    res = {}
    for cond in conditions:
        split, g = cond.split("_")
        prompts, labels = digit_prompts(TRAIN_TEMPLATES if split == "id" else HELDOUT_TEMPLATES, n_per_condition)
        x = generate_digits(bundle, prompts, guidance_scale=guidance_scale if g == "cfg" else 1.0,
                            num_inference_steps=num_inference_steps, seed=seed)
        res.update({f"{cond}/{k}": v for k, v in judge.score(x, labels).items()})
    return res


def report_digits_run(run_dir, n_per_condition: int = 100, num_inference_steps: int = 20, seed: int = 0) -> dict:
    """Judge a finished digits run against its base model: writes run_dir/eval.json and returns
    {"base": metrics, "final": metrics} (same prompts and noise for both)."""
    import config
    import data
    import models
    import runtime
    import train
    run_dir = Path(run_dir)
    cfg = config.resolve({k: v for k, v in json.loads((run_dir / "config.json").read_text()).items()})
    judge = DigitsJudge.from_splits(data.load_digits_splits(seed=DIGIT_SPLIT_SEED))
    base_dir = train.ensure_digits_base(cfg, runtime.Dist())
    res = {"judge_real_accuracy": judge.real_accuracy}
    for name, path in (("base", base_dir), ("final", run_dir / "final")):
        res[name] = evaluate_digits_model(models.build_model("digits", str(path)), judge, seed=seed,
                                          n_per_condition=n_per_condition, num_inference_steps=num_inference_steps)
    (run_dir / "eval.json").write_text(json.dumps(res, indent=1))
    rows = ["condition              metric      base    final"]
    for key in res["final"]:
        rows.append(f"{key.split('/')[0]:<22} {key.split('/')[1]:<10} {res['base'][key]:7.3f}  {res['final'][key]:7.3f}")
    print(f"judge (accuracy {judge.real_accuracy:.3f} on real held-out digits) on {n_per_condition} "
          f"generated digits per condition; id/ood = training/held-out caption templates, "
          f"cfg/nocfg = guidance 3 / none:\n" + "\n".join(rows))
    return res


# ----------------------------------------------------------------------------- the digits table

# name -> train.run overrides (method presets live in config.METHOD_PRESETS). Every method
# aligns the same cached base with the same max_steps and batch size; "base" is not trained.
METHODS = {
    "base": None,
    "sft": {"method": "sft"},
    "dpo": {"method": "dpo"},
    "spin": {"method": "spin"},
    "sspo": {"method": "sspo"},
    "sspo_r": {"method": "sspo_r"},
    "dpo_cm": {"method": "dpo_cm"},
    "sdpo": {"method": "sdpo"},
    "sspo ssr=none": {"method": "sspo", "ssr": "none"},
    "sspo ssr=indicator": {"method": "sspo", "ssr": "indicator"},
    "sspo replay=initial": {"method": "sspo", "replay": "initial"},
    "sspo replay=last": {"method": "sspo", "replay": "last"},
}
SIZES = {
    # train: extra train.run overrides (None = the digits preset's value). save_every is also the
    # replay-pool snapshot interval, so the full table keeps the preset's.
    # Sized to finish well under an hour on 2 CPU cores with --jobs 2 (batch 16 instead of the
    # main job's 32; every method gets the same updates and batch).
    "full": dict(seeds=3, train={"max_steps": 300, "batch_size": 16}, n_final=100, n_curve=50,
                 inference_steps=20, curve_inference_steps=10, curve_points=6),
    # CI smoke test: numbers are meaningless (small base, few updates).
    "quick": dict(seeds=2, train={"max_steps": 10, "save_every": 5, "batch_size": 8, "loser_steps": 3,
                                  "digits_base_steps": 100}, n_final=40, n_curve=20, inference_steps=5,
                  curve_inference_steps=3, curve_points=2),
}
CURVE_CONDITIONS = ("id_nocfg", "ood_nocfg")  # guidance saturates accuracy fast (DESIGN.md), so curves go without


def _checkpoints_for_curve(run_dir: Path, points: int) -> list[Path]:
    """At most `points` evenly spaced checkpoints/step_XXXXXX/ (the last one always)."""
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
    idx = np.unique(np.linspace(len(ckpts) - 1, 0, points).round().astype(int)) if ckpts else []
    return [ckpts[i] for i in sorted(idx)]


def _curve(bundle, run_dir: Path, judge, size: dict, seed: int, base_point: dict) -> list:
    """[(update, metrics)]: the base at update 0, then checkpoints' trainable weights loaded in place."""
    from safetensors.torch import load_file
    import runtime
    points = [(0, base_point)]
    for ckpt in _checkpoints_for_curve(run_dir, size["curve_points"]):
        runtime.load_trainable(bundle, load_file(str(ckpt / "trainable.safetensors")))
        points.append((int(ckpt.name.split("_")[1]), evaluate_digits_model(
            bundle, judge, n_per_condition=size["n_curve"], num_inference_steps=size["curve_inference_steps"],
            seed=seed, conditions=CURVE_CONDITIONS)))
    return points


def _ssr_curve(run_dir: Path) -> list:
    """[(update, ssr_rate)] from metrics.jsonl (empty for methods without SSR)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [(r["step"], r["ssr_rate"]) for r in rows if r.get("ssr_rate") is not None]


def _judge() -> "DigitsJudge":
    import data
    return DigitsJudge.from_splits(data.load_digits_splits(seed=DIGIT_SPLIT_SEED))


def _run_one(name: str, seed: int, out: Path, size: dict, common: dict, base_curve: dict,
             keep_checkpoints: bool, threads: int = 0) -> dict:
    """Train one (method, seed) with train.run and judge its final model and checkpoints."""
    import shutil
    import models
    import train
    if threads:
        torch.set_num_threads(threads)
    judge = _judge()  # deterministic fit: every worker process has the same judge
    run_dir = out / "runs" / name.replace(" ", "_").replace("=", "-") / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    t0 = time.time()
    run_dir = Path(train.run({**common, **METHODS[name], "seed": seed, "out_dir": str(run_dir),
                              "sample_every": 0}))
    train_s = time.time() - t0
    bundle = models.build_model("digits", path=str(run_dir / "final"))
    final = evaluate_digits_model(bundle, judge, n_per_condition=size["n_final"],
                                  num_inference_steps=size["inference_steps"], seed=seed)
    row = {"seed": seed, "train_seconds": train_s, "final": final,
           "curve": _curve(bundle, run_dir, judge, size, seed, base_curve), "ssr": _ssr_curve(run_dir)}
    if not keep_checkpoints:  # ~12 MB each (weights + optimizer); final/ and metrics.jsonl stay
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print(f"{name} seed {seed}: {train_s:.0f}s train, " +
          ", ".join(f"{k}={v:.3f}" for k, v in final.items() if k.endswith("accuracy")), flush=True)
    return row


def run_table(out: Path, size: dict, methods=None, keep_checkpoints: bool = False, jobs: int = 1) -> dict:
    """Train every method for every seed with train.run, judge the final models and the
    checkpoints (learning curves). Generation seed = training seed: all methods see the same noise.
    jobs > 1 runs (method, seed) pairs in that many worker processes with one torch thread each
    (on a small CPU, two single-thread runs side by side beat one two-thread run)."""
    import concurrent.futures
    import multiprocessing
    import config
    import models
    import runtime
    import train
    out.mkdir(parents=True, exist_ok=True)
    judge = _judge()
    print(f"judge accuracy on real eval digits: {judge.real_accuracy:.4f}", flush=True)
    common = {k: v for k, v in size["train"].items() if v is not None}
    base_dir = train.ensure_digits_base(config.resolve(common), runtime.setup_distributed())
    base = models.build_model("digits", path=str(base_dir))
    base_final, base_curve = {}, {}
    for seed in range(size["seeds"]):
        base_final[seed] = evaluate_digits_model(base, judge, n_per_condition=size["n_final"],
                                                 num_inference_steps=size["inference_steps"], seed=seed)
        base_curve[seed] = evaluate_digits_model(base, judge, n_per_condition=size["n_curve"], seed=seed,
                                                 num_inference_steps=size["curve_inference_steps"],
                                                 conditions=CURVE_CONDITIONS)
    results = {"size": size, "judge_accuracy": judge.real_accuracy, "base_model": str(base_dir), "runs": {}}
    names = list(methods or METHODS)
    todo = [(n, s) for n in names if METHODS[n] is not None for s in range(size["seeds"])]
    args = {key: (key[0], key[1], out, size, common, base_curve[key[1]], keep_checkpoints) for key in todo}
    if jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = {key: pool.submit(_run_one, *a, threads=1) for key, a in args.items()}
            done = {key: f.result() for key, f in futures.items()}
    else:
        done = {key: _run_one(*a) for key, a in args.items()}
    for name in names:  # the table's order, whatever order the runs finished in
        for seed in range(size["seeds"]):
            results["runs"].setdefault(name, []).append(
                done[(name, seed)] if METHODS[name] is not None else
                {"seed": seed, "train_seconds": 0.0, "final": base_final[seed], "curve": [], "ssr": []})
    return results


def summarize(results: dict) -> dict:
    """method -> metric -> [mean, std over seeds]."""
    summary = {}
    for name, runs in results["runs"].items():
        keys = runs[0]["final"].keys()
        summary[name] = {k: [float(np.mean([r["final"][k] for r in runs])), float(np.std([r["final"][k] for r in runs]))]
                         for k in keys}
    return summary


def write_table_md(results: dict, summary: dict, path: Path, command: str) -> None:
    """Four markdown tables (in/out-of-distribution prompts x with/without guidance), mean +- std."""
    size = results["size"]
    lines = ["# Digits results\n",
             f"`{command}` — {results['date']}; {size['seeds']} seeds; train overrides {json.dumps(size['train'])}; "
             f"~{size['n_final']} generated digits per condition, {size['inference_steps']} DDIM steps, guidance 3.\n",
             f"Judge accuracy on real held-out eval digits: {results['judge_accuracy']:.4f}. "
             "acc = prompt alignment (higher is better); conf = mean judge probability of the prompted digit; "
             "FD = Frechet distance to real eval digits in the judge's PCA features (lower is better). "
             "`base` is the starting model (no updates; its ± is sampling noise only).\n"]
    titles = {"id": "in-distribution prompts (training caption templates)",
              "ood": "out-of-distribution prompts (held-out caption templates)"}
    for split in ("id", "ood"):
        for g, gname in (("cfg", "with guidance"), ("nocfg", "without guidance")):
            lines += [f"\n## {titles[split]}, {gname}\n", "| method | acc | conf | FD |", "|---|---|---|---|"]
            for name, s in summary.items():
                cells = [f"{s[f'{split}_{g}/{k}'][0]:.3f} ± {s[f'{split}_{g}/{k}'][1]:.3f}"
                         for k in ("accuracy", "confidence", "frechet")]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def _mean_over_seeds(series: list[dict]):
    """Steps common to every seed, and the (seeds, steps) array of values."""
    steps = sorted(set.intersection(*(set(c) for c in series))) if series else []
    return steps, np.array([[c[s] for s in steps] for c in series])


def plot_curves(results: dict, out: Path) -> list[Path]:
    """curve_<metric>.png: metric vs update per method without guidance, in/out-of-distribution
    prompts (paper Fig. 2 / Fig. 9); ssr_rate.png: SSR rate vs update (Fig. 4). Seed means, +- std bands."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths, colors = [], plt.cm.tab20(np.linspace(0, 1, 20))
    for metric in ("accuracy", "confidence", "frechet"):
        fig, axes = plt.subplots(1, len(CURVE_CONDITIONS), figsize=(12, 4.5), sharex=True)
        for ax, cond in zip(np.atleast_1d(axes), CURVE_CONDITIONS):
            for i, (name, runs) in enumerate(results["runs"].items()):
                steps, y = _mean_over_seeds([dict((s, m[f"{cond}/{metric}"]) for s, m in r["curve"]) for r in runs if r["curve"]])
                if steps:
                    ax.plot(steps, y.mean(0), marker=".", label=name, color=colors[i % 20])
                    ax.fill_between(steps, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=colors[i % 20], alpha=0.12)
            ax.set_title(f"{'training' if cond.startswith('id') else 'held-out'} caption templates, no guidance")
            ax.set_xlabel("update")
            ax.set_ylabel(metric)
        np.atleast_1d(axes)[-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        paths.append(out / f"curve_{metric}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, runs) in enumerate(results["runs"].items()):
        steps, y = _mean_over_seeds([dict(r["ssr"]) for r in runs if r["ssr"]])
        if steps:
            ax.plot(steps, y.mean(0), label=name, color=colors[i % 20])
    ax.set_xlabel("update")
    ax.set_ylabel("SSR rate (fraction of pairs with s = +1)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "ssr_rate.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def update_readme(marker: str, text: str, readme: Path = Path(__file__).resolve().parent / "README.md") -> None:
    """Replace the block between <!-- results:MARKER --> and <!-- /results:MARKER --> in the
    README with generated text, so the README's numbers always come from a command."""
    src = readme.read_text()
    head, tail = f"<!-- results:{marker} -->", f"<!-- /results:{marker} -->"
    if head not in src or tail not in src:
        raise ValueError(f"{readme} lacks the markers {head} ... {tail}")
    before, rest = src.split(head, 1)
    after = rest.split(tail, 1)[1]
    readme.write_text(f"{before}{head}\n{text.strip()}\n{tail}{after}")


def cmd_table(args) -> None:
    import copy
    size = copy.deepcopy(SIZES["quick" if args.quick else "full"])
    if args.seeds is not None:
        size["seeds"] = args.seeds
    for key, value in (("max_steps", args.steps), ("save_every", args.save_every)):
        if value is not None:
            size["train"][key] = value
    out = Path(args.out)
    t0 = time.time()
    results = run_table(out, size, args.methods, args.keep_checkpoints, args.jobs)
    results["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    results["seconds"] = time.time() - t0
    results["summary"] = summary = summarize(results)
    (out / "table.json").write_text(json.dumps(results, indent=1))
    write_table_md(results, summary, out / "table.md", "python evaluate.py " + " ".join(sys.argv[1:]))
    plot_curves(results, out)
    if args.readme:
        update_readme("table", (out / "table.md").read_text().replace("# Digits results\n", "", 1))
    print((out / "table.md").read_text())
    print(f"wrote {out / 'table.md'}, table.json, curve_*.png, ssr_rate.png in {results['seconds'] / 60:.1f} min")


# ----------------------------------------------------------------------------- real-scale generation

def pipeline_from_bundle(bundle):
    """Wrap a models.Bundle (sd15 / animatediff) in diffusers' own pipeline, DDIM sampler."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, StableDiffusionPipeline
    sched = DDIMScheduler.from_config(bundle.scheduler_config)
    parts = dict(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet, scheduler=sched)
    if bundle.family == "animatediff":
        return AnimateDiffPipeline(**parts, motion_adapter=None)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_pipeline(family: str, checkpoint, *, lora=None, motion_adapter=None, scheduler: str = "ddim",
                  device: str = "cpu", dtype: str = "float32"):
    """A diffusers pipeline from a local checkpoint: a full pipeline directory (model_index.json),
    or this project's save_model layout (unet/, text_encoder/, tokenizer/, scheduler/, vae/;
    loaded with models.build_model), plus optional diffusers-format LoRA weights (`lora`)."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, StableDiffusionPipeline
    ckpt = Path(checkpoint)
    if (ckpt / "model_index.json").exists():
        if family == "animatediff":
            adapter = MotionAdapter.from_pretrained(motion_adapter, local_files_only=True) if motion_adapter else None
            pipe = AnimateDiffPipeline.from_pretrained(ckpt, motion_adapter=adapter, local_files_only=True)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(ckpt, safety_checker=None, requires_safety_checker=False,
                                                           local_files_only=True)
    elif (ckpt / "unet").is_dir():
        import models
        pipe = pipeline_from_bundle(models.build_model(family, path=str(ckpt), motion_adapter_path=motion_adapter))
    else:
        raise FileNotFoundError(f"no checkpoint at {ckpt}: expected a diffusers pipeline directory (model_index.json) "
                                "or a save_model directory (unet/, text_encoder/, tokenizer/, scheduler/, vae/)")
    if lora:
        pipe.load_lora_weights(str(lora))
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
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch"):
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


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="train and evaluate every method on digits; write table.md/json + plots")
    t.add_argument("--quick", action="store_true", help="CI smoke size (tiny base, 10 updates, 2 seeds)")
    t.add_argument("--seeds", type=int, help="number of training seeds (default 3; quick 2)")
    t.add_argument("--steps", type=int, help="optimizer updates per method (same for all)")
    t.add_argument("--save-every", type=int, help="checkpoint + replay-pool snapshot interval (default: the preset's)")
    t.add_argument("--methods", nargs="+", choices=list(METHODS), help="subset of methods (default all)")
    t.add_argument("--keep-checkpoints", action="store_true", help="keep runs/*/checkpoints (deleted after the curves)")
    t.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="(method, seed) runs in parallel worker processes, one torch thread each")
    t.add_argument("--out", default="results", help="output folder")
    t.add_argument("--readme", action="store_true", help="also put table.md into README.md")
    g = sub.add_parser("generate", help="generate images/videos from a trained checkpoint")
    g.add_argument("--family", choices=["sd15", "animatediff"], default="sd15")
    g.add_argument("--checkpoint", required=True, help="pipeline dir (model_index.json) or save_model dir")
    g.add_argument("--lora", help="diffusers-format LoRA weights to load on top of --checkpoint")
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
    s.add_argument("--hpsv2", help="local HPSv2 checkpoint (needs the hpsv2 package)")
    s.add_argument("--imagereward", help="local ImageReward.pt (needs the image-reward package)")
    s.add_argument("--reference", help="real images/videos named like the generated files (PSNR, FID, FVD)")
    s.add_argument("--fid-clip", help="local CLIP dir whose image embeddings define FID")
    s.add_argument("--i3d", help="local TorchScript I3D (FVD)")
    s.add_argument("--out", help="scores JSON (default: <generated>/scores.json)")
    args = p.parse_args(argv)
    if args.cmd == "table":
        cmd_table(args)
    elif args.cmd == "report":
        report_digits_run(args.run_dir)
    elif args.cmd == "generate":
        from scorers import load_prompts
        prompts = load_prompts(args.prompts, args.column, args.limit)
        pipe = load_pipeline(args.family, args.checkpoint, lora=args.lora, motion_adapter=args.motion_adapter,
                             scheduler=args.scheduler, device=args.device, dtype=args.dtype)
        print(generate(pipe, prompts, Path(args.out), seed=args.seed, batch_size=args.batch_size,
                       num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
                       width=args.width, num_frames=args.num_frames))
    else:
        kw = {k: getattr(args, k) for k in ("clip", "pickscore", "pickscore_processor", "aesthetic_clip",
                                              "aesthetic_head", "hpsv2", "imagereward", "reference", "fid_clip", "i3d")}
        from scorers import score_generated
        scores = score_generated(args.generated, **kw)
        out = Path(args.out or Path(args.generated) / "scores.json")
        out.write_text(json.dumps(scores, indent=1))
        print(json.dumps(scores["mean"], indent=1))


if __name__ == "__main__":
    main()
