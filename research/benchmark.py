"""The benchmark runner: trains and evaluates many runs on the embedded digits task and writes
the results into results/. It sits on top of everything (it imports the entry point train.py),
and nothing imports it.

    python -m research.benchmark sweep  [--jobs N]   # lr and beta per method on a validation measure -> results/sweep.md
    python -m research.benchmark readme --run runs/digits_sspo   # the default run's eval.json -> the README's table
    python -m research.benchmark claims [--jobs N]   # every method x 3 seeds -> results/claims.md, table.md, grid, curves
    python -m research.benchmark claims --quick      # CI smoke size (numbers meaningless)

Fair settings: every method trains on the same data, for the same number of updates and batch
size, from the same base, and is judged by the same judge on the same noise. Its lr (and beta
for the preference methods) come from ``sweep`` (results/sweep.json) when that file exists: the
setting with the best validation accuracy (training templates, no guidance, generation noise
seed 1000, which evaluation never uses; ties -> lower Frechet distance to the *align* split's
real digits). Evaluation uses seeds 0..S-1 and the held-out *eval* split.
    python -m research.benchmark frontier [--quick] [--seeds N] [--jobs N]   # loser sampling: cost vs quality
    python -m research.benchmark noise [--quick] [--jobs N]   # SFT / DPO / SSPO vs the share of swapped pairs

Preference noise (``pair_noise``, digits.DigitsDataset): Pick-a-Pic's labels are noisy (a second
annotator agrees with the recorded choice 68.0% of the time, i.e. p = 0.2 if both err
independently at rate p); ``claims --pair-noise 0.2`` runs the table in that regime.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import json
import multiprocessing
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import config
import digits
import digits.judge
from research import loser_frontier
import models
from research import report
import train
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]  # the repository

# name -> train.run overrides (method settings live in config.METHODS). Every method
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
    # Memorization (paper: "SFT memorizes, SSPO generalizes"): an alignment split of 5 digits per
    # class, small enough to memorize within the run.
    "sft small-align": {"method": "sft", "digits_align_per_class": 5},
    "sspo small-align": {"method": "sspo", "digits_align_per_class": 5},
}
VALIDATION_SEED = 1000  # generation noise for the sweep; evaluation uses seeds 0..S-1
SWEEP = {"lr": (1e-4, 3e-4, 1e-3), "beta": (500.0, 2500.0)}
SIZES = {
    # train: extra train.run overrides (None = the digits preset's value). save_every is also the
    # replay-pool snapshot interval, so the full table keeps the preset's.
    # Sized to finish well under an hour on 2 CPU cores with --jobs 2 (batch 16 instead of the
    # main job's 32; every method gets the same updates and batch).
    "full": dict(seeds=3, train={"max_steps": 300, "batch_size": 16}, n_final=100, n_curve=50,
                 inference_steps=20, curve_inference_steps=10, curve_points=6, memo_steps=20),
    # The validation sweep: shorter runs, one seed, curve-sized evaluation.
    "sweep": dict(seeds=1, train={"max_steps": 200, "batch_size": 16}, n_final=50, n_curve=50,
                  inference_steps=10, curve_inference_steps=10, curve_points=2),
    # CI smoke test: numbers are meaningless (a base at chance, few updates). The least that
    # still runs every code path: 2 seeds (a t-interval needs 2), two checkpoints (a curve of
    # base + 2 points; replay draws from 2 snapshots), the fewest prompts digit_prompts balances
    # over the templates (30 training, 20 held-out).
    "quick": dict(seeds=2, train={"max_steps": 4, "save_every": 2, "batch_size": 4, "loser_steps": 2,
                                  "digits_base_steps": 20}, n_final=20, n_curve=10, inference_steps=3,
                  curve_inference_steps=2, curve_points=2, memo_steps=2),
}
FRONTIER_SIZES = {  # the loser-sampling frontier (loser_frontier.py)
    # save_every (the replay pool's snapshot interval) must be a multiple of every loser_every in
    # loser_frontier.FRONTIER: 24 instead of the claims run's 25, the same for every setting
    "full": dict(SIZES["full"], seeds=3, train={"max_steps": 300, "batch_size": 16, "save_every": 24}),
    "quick": dict(SIZES["quick"], seeds=2, train={**SIZES["quick"]["train"], "max_steps": 8, "save_every": 4}),
}
# The preference-noise sweep (cmd_noise): the claims run's training at each share of swapped
# pairs; curves are not used there, so they are short.
NOISE_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4)
NOISE_METHODS = ("sft", "dpo", "sspo")
NOISE_SIZES = {
    "full": dict(SIZES["full"], curve_points=2, n_curve=20),
    "quick": dict(SIZES["quick"], seeds=2, curve_points=1, n_curve=10, n_final=20),
}
CALIBRATED_NOISE = 0.2  # Pick-a-Pic's 68.0% agreement: (1 - p)^2 + p^2 = 0.68
CURVE_CONDITIONS = ("id_nocfg", "ood_nocfg")  # guidance saturates accuracy fast on digits, so curves go without


def _checkpoints_for_curve(run_dir: Path, points: int) -> list[Path]:
    """At most `points` evenly spaced checkpoints/step_XXXXXX/ (the last one always)."""
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
    idx = np.unique(np.linspace(len(ckpts) - 1, 0, points).round().astype(int)) if ckpts else []
    return [ckpts[i] for i in sorted(idx)]


def _curve(bundle, run_dir: Path, judge, size: dict, seed: int, base_point: dict) -> list:
    """[(update, metrics)]: the base at update 0, then checkpoints' trainable weights loaded in place."""
    points = [(0, base_point)]  # the base model, judged on the same noise
    for ckpt in _checkpoints_for_curve(run_dir, size["curve_points"]):
        models.load_trainable(bundle, load_file(str(ckpt / "trainable.safetensors")))
        points.append((int(ckpt.name.split("_")[1]), digits.judge.evaluate_model(
            bundle, judge, n_per_condition=size["n_curve"], num_inference_steps=size["curve_inference_steps"],
            seed=seed, conditions=CURVE_CONDITIONS)))
    return points


def _ssr_curve(run_dir: Path) -> list:
    """[(update, ssr_rate)] from metrics.jsonl (empty for methods without SSR)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [(r["step"], r["ssr_rate"]) for r in rows if r.get("ssr_rate") is not None]


def _tuned(overrides: dict, tuned: dict) -> dict:
    """The sweep's lr/beta for this run's method (ablations inherit their method's), then the run's own."""
    chosen = tuned.get(overrides["method"], {})
    return {**{k: chosen[k] for k in ("lr", "beta") if k in chosen}, **overrides}


def _memo(bundle, overrides: dict, seed: int, steps: int) -> dict:
    """Copying and diversity (report.memorization) of 10 samples per digit, training templates,
    guidance 3, `steps` sampling steps, against the run's alignment digits (the first 40 per class
    of the full split, or the small split itself) and as many held-out eval digits per class."""
    per_class = overrides.get("digits_align_per_class", 0) or 40
    align, heldout = digits.real_subset("align", per_class)[0], digits.real_subset("eval", per_class)[0]
    prompts, labels = digits.judge.digit_prompts(digits.TRAIN_TEMPLATES[:1], 100)
    x = digits.judge.generate_digits(bundle, prompts, seed=seed, num_inference_steps=steps)
    return report.memorization(x, labels, align, heldout)


def _run_one(name: str, spec: dict, seed: int, out: Path, size: dict, common: dict, base_curve: dict,
             keep_checkpoints: bool, tuned: dict, threads: int = 0) -> dict:
    """Train one (method, seed) with train.run and judge its final model and checkpoints."""
    if threads:
        torch.set_num_threads(threads)
    judge = digits.judge.DigitsJudge.from_splits()  # deterministic fit: every worker process has the same judge
    run_dir = out / "runs" / name.replace(" ", "_").replace("=", "-") / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    overrides = _tuned(spec, tuned)
    t0 = time.time()
    run_dir = Path(train.run({**common, **overrides, "seed": seed, "out_dir": str(run_dir), "sample_every": 0}))
    train_s = time.time() - t0
    bundle = models.build_model("digits", path=str(run_dir / "final"))
    final = digits.judge.evaluate_model(bundle, judge, n_per_condition=size["n_final"],
                                  num_inference_steps=size["inference_steps"], seed=seed)
    row = {"seed": seed, "train_seconds": train_s, "final": final, "run_dir": str(run_dir),
           "memo": _memo(bundle, overrides, seed, size["memo_steps"]), "settings": overrides,
           "curve": _curve(bundle, run_dir, judge, size, seed, base_curve), "ssr": _ssr_curve(run_dir)}
    if not keep_checkpoints:  # ~12 MB each (weights + optimizer); final/ and metrics.jsonl stay
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print(f"{name} seed {seed}: {train_s:.0f}s train, " +
          ", ".join(f"{k}={v:.3f}" for k, v in final.items() if k.endswith("accuracy")), flush=True)
    return row


def _in_workers(fn, args: dict, jobs: int) -> dict:
    """{key: fn(*args[key])}, in `jobs` spawned worker processes with one torch thread each."""
    if jobs <= 1:
        return {key: fn(*a) for key, a in args.items()}
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        futures = {key: pool.submit(fn, *a, threads=1) for key, a in args.items()}
        return {key: f.result() for key, f in futures.items()}


def _base(size: dict) -> tuple[dict, Path]:
    common = {k: v for k, v in size["train"].items() if v is not None}
    cfg = config.resolve(common)
    return common, digits.ensure_base(cfg.cache_dir, cfg.digits_base_steps, cfg.digits_corrupt)


def run_table(out: Path, size: dict, methods=None, keep_checkpoints: bool = False, jobs: int = 1,
              tuned: dict | None = None, specs: dict | None = None) -> dict:
    """Train every method for every seed with train.run, judge the final models and the
    checkpoints (learning curves). Generation seed = training seed: all methods see the same noise.
    jobs > 1 runs (method, seed) pairs in that many worker processes with one torch thread each
    (on a small CPU, two single-thread runs side by side beat one two-thread run).
    specs: name -> train.run overrides (None = not trained: the base); default METHODS."""
    specs = METHODS if specs is None else specs
    out.mkdir(parents=True, exist_ok=True)
    judge = digits.judge.DigitsJudge.from_splits()
    print(f"judge accuracy on real eval digits: {judge.real_accuracy:.4f}", flush=True)
    common, base_dir = _base(size)
    base = models.build_model("digits", path=str(base_dir))
    base_rows = {}
    for seed in range(size["seeds"]):
        curve = digits.judge.evaluate_model(base, judge, n_per_condition=size["n_curve"], seed=seed,
                                      num_inference_steps=size["curve_inference_steps"], conditions=CURVE_CONDITIONS)
        base_rows[seed] = {"seed": seed, "train_seconds": 0.0, "curve": [], "ssr": [], "run_dir": str(base_dir),
                           "final": digits.judge.evaluate_model(base, judge, n_per_condition=size["n_final"],
                                                          num_inference_steps=size["inference_steps"], seed=seed),
                           "memo": _memo(base, {}, seed, size["memo_steps"]), "base_curve": curve}
    results = {"size": size, "judge_accuracy": judge.real_accuracy, "base_model": str(base_dir), "runs": {},
               "tuned": tuned or {}}
    names = list(methods or specs)
    for n in names:  # every setting's config is checked before the first run trains, not an hour in
        if specs[n] is not None:
            config.resolve({**common, **_tuned(specs[n], tuned or {})})
    todo = [(n, s) for n in names if specs[n] is not None for s in range(size["seeds"])]
    done = _in_workers(_run_one, {key: (key[0], specs[key[0]], key[1], out, size, common,
                                        base_rows[key[1]]["base_curve"], keep_checkpoints, tuned or {})
                                  for key in todo}, jobs)
    for name in names:  # the table's order, whatever order the runs finished in
        results["runs"][name] = [done[(name, s)] if specs[name] is not None else base_rows[s]
                                 for s in range(size["seeds"])]
    return results


# ----------------------------------------------------------------------------- the sweep

def _validation(bundle, size: dict) -> dict:
    """The sweep's measure: accuracy and FD (against the real *align* digits, not eval) on
    training templates without guidance, generation noise VALIDATION_SEED."""
    judge = digits.judge.DigitsJudge.from_splits(ref_split="align")
    m = digits.judge.evaluate_model(bundle, judge, n_per_condition=size["n_curve"], seed=VALIDATION_SEED,
                              num_inference_steps=size["curve_inference_steps"], conditions=("id_nocfg",))
    return {"accuracy": m["id_nocfg/accuracy"], "frechet": m["id_nocfg/frechet"]}


def _sweep_one(method: str, lr: float, beta: float, out: Path, size: dict, common: dict,
               threads: int = 0) -> dict:
    """Train one setting (seed 0) and score it on the validation measure."""
    if threads:
        torch.set_num_threads(threads)
    run_dir = out / "sweep" / f"{method}_lr{lr:g}_beta{beta:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    train.run({**common, "method": method, "lr": lr, "beta": beta, "seed": 0, "out_dir": str(run_dir),
               "sample_every": 0, "keep_checkpoints": 1})
    m = _validation(models.build_model("digits", path=str(run_dir / "final")), size)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"sweep {method} lr={lr:g} beta={beta:g}: acc={m['accuracy']:.3f} FD={m['frechet']:.2f}", flush=True)
    return {"method": method, "lr": lr, "beta": beta, **m}


def run_sweep(out: Path, size: dict, jobs: int, methods=None) -> dict:
    """lr x beta per method (lr only for SFT); returns {method: {"lr", "beta"}} and the rows.
    methods: a subset of the trained methods (default every one)."""
    out.mkdir(parents=True, exist_ok=True)
    common, base_dir = _base(size)
    base = _validation(models.build_model("digits", path=str(base_dir)), size)
    methods = sorted(methods or {m["method"] for m in METHODS.values() if m})
    todo = [(m, lr, beta) for m in methods for lr in SWEEP["lr"]
            for beta in (SWEEP["beta"] if m != "sft" else SWEEP["beta"][:1])]
    rows = list(_in_workers(_sweep_one, {k: (*k, out, size, common) for k in todo}, jobs).values())
    best = {m: report.choose([r for r in rows if r["method"] == m], base["frechet"]) for m in methods}
    return {"best": best, "rows": rows, "size": size, "base": base, "max_fd_ratio": report.SWEEP_MAX_FD_RATIO}


# ----------------------------------------------------------------------------- commands

def write_grid(results: dict, path: Path) -> None:
    """One row per method (seed 0's final model), one column per prompted digit, guidance 3."""
    prompts = [digits.digit_caption(d, digits.TRAIN_TEMPLATES[0]) for d in range(10)]
    rows = {}
    for name, runs in results["runs"].items():
        path_ = runs[0]["run_dir"] if METHODS[name] is None else Path(runs[0]["run_dir"]) / "final"
        rows[name] = digits.judge.generate_digits(models.build_model("digits", path=str(path_)), prompts, seed=0)
    report.labelled_grid(rows).save(path)


def sweep_file(out: Path, pair_noise: float = 0.0) -> Path:
    """Where the sweep at this share of swapped pairs writes its choice: sweep.json (clean pairs),
    sweep_p0.2.json (pair_noise 0.2)."""
    return out / (f"sweep_p{pair_noise:g}.json" if pair_noise else "sweep.json")


def _load_tuned(out: Path, quick: bool, path: str | None = None) -> dict:
    """The sweep's chosen lr/beta per method, or {} (the presets): ``path`` (e.g.
    results/sweep_p0.2.json) over the sweep.json beside it, which keeps the methods a sweep on a
    subset did not try; without ``path``, <out>/sweep.json."""
    if quick:
        return {}
    if path and not Path(path).exists():
        raise SystemExit(f"--sweep {path}: no such file (run `python -m research.benchmark sweep` first)")
    chosen = {}
    for f in ([Path(path).parent / "sweep.json", Path(path)] if path else [out / "sweep.json"]):
        if f.exists():
            chosen.update(json.loads(f.read_text())["best"])
    return chosen


def _tuned_source(results: dict, sweep: str | None) -> str:
    """Where a claims run's lr/beta came from, for its report header."""
    if not results.get("tuned"):
        return "the preset (no sweep file)"
    chosen = ", ".join(f"{m} lr {c['lr']:g}" + (f" beta {c['beta']:g}" if m != "sft" else "")
                       for m, c in sorted(results["tuned"].items()))
    return f"{sweep + ' over results/sweep.json' if sweep else 'results/sweep.json'} ({chosen})"


def calibrated_runs(paths: list[str], level: float = CALIBRATED_NOISE) -> tuple[dict, list[str]]:
    """The runs at pair_noise = ``level`` gathered from several finished runs, as one results dict
    for report.build_claims, and one line per source naming the methods taken from it. A source is
    a claims table.json trained with ``--pair-noise level`` or a noise.json (its level ``level``).
    A method found in several sources is taken from the first (list the run with the condition's
    own lr/beta choice first); a source at another noise level, or one that adds nothing, is refused."""
    key, merged, sources = f"{level:g}", {"runs": {}}, []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "per_level" in data:
            if key not in data["per_level"]:
                raise SystemExit(f"{path} holds no pair_noise = {key} level (levels: {data['levels']})")
            part = data["per_level"][key]
            # the command that trained this level (levels may have been added by later commands)
            origin = next(c for c in report._noise_commands(data) if level in c["levels"])
        else:
            got = data["size"]["train"].get("pair_noise", 0.0)
            if got != level:
                raise SystemExit(f"{path} was trained at pair_noise = {got:g}, not {key}")
            part = origin = data
        new = [n for n in part["runs"] if n not in merged["runs"]]
        if not [n for n in new if n != "base"]:
            raise SystemExit(f"{path}: every method in it already comes from an earlier source")
        merged["runs"].update({n: part["runs"][n] for n in new})
        merged.setdefault("size", data["size"])
        sources.append(f"`{origin.get('command', path)}` ({origin.get('date', '?')}: "
                       f"{', '.join(n for n in new if n != 'base')})")
    return merged, sources


def cmd_claims(args) -> None:
    size = copy.deepcopy(SIZES["quick" if args.quick else "full"])
    if args.seeds is not None:
        size["seeds"] = args.seeds
    if args.steps is not None:
        size["train"]["max_steps"] = args.steps
    if args.pair_noise:
        size["train"]["pair_noise"] = args.pair_noise
    if args.curve_points is not None:
        size["curve_points"] = args.curve_points
    out = Path(args.out)
    tuned = _load_tuned(out, args.quick, args.sweep)
    if args.from_json:  # re-derive tables, verdicts and pictures from a finished run, no training
        results = json.loads(Path(args.from_json).read_text())
        if args.methods:  # a subset of the recorded runs
            results["runs"] = {name: results["runs"][name] for name in args.methods}
        size, tuned = results["size"], results.get("tuned", {})
        command = results.get("command", f"(a run recorded in {args.from_json})")
    else:
        t0 = time.time()
        results = run_table(out, size, args.methods, args.keep_checkpoints, args.jobs, tuned)
        command = "python -m research.benchmark " + shlex.join(args.argv)
        results.update(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), seconds=time.time() - t0,
                       command=command)
    results["summary"] = summary = report.summarize(results)
    (out / "table.json").write_text(json.dumps(results, indent=1))
    report.write_table_md(results, summary, out / "table.md", command)
    rows = report.build_claims(results)
    header = (f"# The paper's claims on the digits benchmark\n\n`{command}` — {results['date']}, "
              f"{results['seconds'] / 60:.0f} min; {size['seeds']} seeds; {json.dumps(size['train'])}; "
              f"settings per method: {_tuned_source(results, args.sweep)}. "
              "Verdict rule: 95% t-interval of the paired (same seed) difference; an accuracy win whose "
              f"Frechet distance is more than {report.REALISM_RATIO}x the other side's is a trade-off "
              "(research/report.py, realism_verdict)."
              + (f" Rewritten from {args.from_json} on {datetime.datetime.now():%Y-%m-%d %H:%M} (no "
                 f"retraining) by `python -m research.benchmark {shlex.join(args.argv)}`." if args.from_json else ""))
    body = report.claims_markdown(rows, header)
    if args.calibrated or args.long:  # the main condition first: pairs as noisy as Pick-a-Pic's
        sections = [header, ""]
        long = json.loads(Path(args.long).read_text()) if args.long else None
        if args.calibrated:
            noisy, sources = calibrated_runs(args.calibrated)
            noisy_rows = report.build_claims(noisy)
            if long:  # the curve claims are judged on the long runs, not on 300-update curves
                noisy_rows = [r for r in noisy_rows if not r["claim"].startswith("Fig.")]
            if out.resolve() == (ROOT / "results").resolve():  # the repository's own results: the README says them
                report.update_readme("noisy", report.accuracy_and_fd_markdown(
                    noisy, f"Judge accuracy (FD: Frechet distance to real digits, lower is better) at "
                           f"pair_noise = {CALIBRATED_NOISE:g}, {noisy['size'].get('seeds', '?')} seeds, "
                           f"written by `python -m research.benchmark {shlex.join(args.argv)}`:"))
            sections.append(report.claims_markdown(noisy_rows, (
                f"## Noisy pairs, pair_noise = {CALIBRATED_NOISE:g} (Pick-a-Pic's 68% agreement): the main "
                f"condition\n\n{noisy['size'].get('train', {}).get('max_steps', '?')} updates; from " + "; ".join(sources)
                + (". The curve claims (Fig. 2 / 4 / 9) are judged on the long runs below." if long else "."))))
        if long:
            steps, p = long["size"]["train"].get("max_steps"), long["size"]["train"].get("pair_noise", 0.0)
            sections.append(report.claims_markdown(report.build_claims(long), (
                f"## Long runs: {steps} updates, pair_noise = {p:g}, evaluated at "
                f"{long['size']['curve_points']} checkpoints\n\n`{long['command']}` ({long['date']}, "
                f"{long['seconds'] / 60:.0f} min; {long['size']['seeds']} seeds; curves: "
                f"{Path(args.long).parent}/curve_accuracy.png, {Path(args.long).parent}/ssr_rate.png)")))
        sections.append(report.claims_markdown(
            rows, "## Clean pairs (every recorded preference right: Diffusion-DPO is handed an oracle)"))
        body = "\n".join(sections)
    (out / "claims.md").write_text(body)
    report.plot_curves(results, out)
    models_here = all(Path(runs[0]["run_dir"]).exists() for runs in results["runs"].values())
    if models_here:
        write_grid(results, out / "samples_grid.png")
    else:  # --from-json on another machine: results/runs/ (the final models) is not in git
        print("samples_grid.png not rewritten: the runs' final models are not here", flush=True)
    print((out / "claims.md").read_text())
    print(f"wrote {out}/claims.md, table.md, table.json, samples_grid.png, curve_*.png, ssr_rate.png "
          f"in {results['seconds'] / 60:.1f} min")


def cmd_sweep(args) -> None:
    size = copy.deepcopy(SIZES["quick" if args.quick else "sweep"])
    if args.pair_noise:
        size["train"]["pair_noise"] = args.pair_noise
    out = Path(args.out)
    sweep = run_sweep(out, size, args.jobs, args.methods)
    path = sweep_file(out, args.pair_noise)
    path.write_text(json.dumps(sweep, indent=1))
    report.write_sweep_md(sweep, path.with_suffix(".md"), "python -m research.benchmark " + shlex.join(args.argv),
                          VALIDATION_SEED)
    print(path.with_suffix(".md").read_text())


def cmd_frontier(args) -> None:
    size = copy.deepcopy(FRONTIER_SIZES["quick" if args.quick else "full"])
    if args.seeds is not None:
        size["seeds"] = args.seeds
    specs = loser_frontier.selected(args.settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    batch, repeats = size["train"]["batch_size"], (3 if args.quick else 7)
    costs = loser_frontier.costs(specs, batch, repeats, log=lambda s: print(s, flush=True))
    runs = len(specs) * size["seeds"]
    train_s = sum(c["sspo_ms"] for c in costs.values()) / 1e3 * size["train"]["max_steps"] * size["seeds"]
    print(f"frontier: {len(specs)} settings x {size['seeds']} seeds = {runs} runs of "
          f"{size['train']['max_steps']} updates; expected duration ~{train_s / max(args.jobs, 1) / 60 * 1.5:.0f} min "
          f"with --jobs {args.jobs} (training time from the costs just measured at one thread, "
          f"+50% for evaluation)", flush=True)
    tuned = _load_tuned(out, args.quick)  # the same SSPO lr/beta as the claims run
    results = run_table(out / "frontier", size, keep_checkpoints=False, jobs=args.jobs, specs=specs, tuned=tuned)
    results.update(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), seconds=time.time() - t0,
                   costs=costs, cost_batch=batch, cost_repeats=repeats, summary=report.summarize(results))
    (out / "loser_frontier.json").write_text(json.dumps(results, indent=1))
    loser_frontier.write(results, out, "python -m research.benchmark " + shlex.join(args.argv))
    print((out / "loser_frontier.md").read_text())
    print(f"wrote {out / 'loser_frontier.md'}, loser_frontier.png, loser_frontier.json in "
          f"{results['seconds'] / 60:.1f} min")


NOISE_KEYS = ("seeds", "train", "n_final", "inference_steps")  # the sizes noise.md's numbers depend on


def _same_noise_runs(a: dict, b: dict) -> bool:
    """Whether two noise sweeps' levels can share one report: the same seeds, training, final
    evaluation and lr/beta (the curve and memorization sizes do not enter noise.md)."""
    return all(a["size"].get(k) == b["size"].get(k) for k in NOISE_KEYS) and a["tuned"] == b["tuned"]


def _joined(prev: dict, per_level: dict, commands: list) -> dict:
    """noise.json of ``prev``'s levels and the new ``per_level`` (which replace those they repeat);
    every command listed with the levels it trained that remain."""
    new = {float(k) for k in per_level}
    kept = {k: v for k, v in prev["per_level"].items() if float(k) not in new} if prev else {}
    earlier = [{**c, "levels": [p for p in c["levels"] if p not in new]} for c in report._noise_commands(prev)] if prev else []
    joined = {**kept, **per_level}
    return {"levels": sorted(float(k) for k in joined), "per_level": joined,
            "commands": [c for c in earlier if c["levels"]] + commands,
            **{k: commands[-1][k] for k in ("command", "date", "seconds")}}


def cmd_noise(args) -> None:
    """SFT, Diffusion-DPO and SSPO at each share of swapped pairs (NOISE_LEVELS), the same base,
    training and judge as claims -> noise.md / noise.json / noise.png. Levels already in
    <out>/noise.json with the same sizes and settings are kept; ``--merge OTHER.json`` joins another
    sweep's levels (trained elsewhere) without training."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prev_path = out / "noise.json"
    if args.merge:
        other = json.loads(Path(args.merge).read_text())
        if not prev_path.exists():
            raise SystemExit(f"--merge: {prev_path} does not exist; nothing to join {args.merge} to")
        prev = json.loads(prev_path.read_text())
        if not _same_noise_runs(prev, other):
            raise SystemExit(f"--merge: {args.merge} and {prev_path} differ in {NOISE_KEYS} or lr/beta: "
                             "their levels cannot share a report")
        results = {"size": prev["size"], "tuned": prev["tuned"],
                   **_joined(prev, other["per_level"], report._noise_commands(other))}
        prev_path.write_text(json.dumps(results, indent=1))
        report.write_noise(results, out)
        print((out / "noise.md").read_text())
        return
    size = copy.deepcopy(NOISE_SIZES["quick" if args.quick else "full"])
    if args.seeds is not None:
        size["seeds"] = args.seeds
    levels = sorted(args.levels or NOISE_LEVELS)
    tuned = _load_tuned(out, args.quick, args.sweep)
    t0 = time.time()
    specs = {"base": None, **{m: METHODS[m] for m in NOISE_METHODS}}
    command = "python -m research.benchmark " + shlex.join(args.argv)
    prev = json.loads(prev_path.read_text()) if prev_path.exists() else None
    if prev and not _same_noise_runs(prev, {"size": json.loads(json.dumps(size)), "tuned": tuned}):
        print(f"{prev_path} was trained with other sizes or settings: its levels are replaced", flush=True)
        prev = None
    if prev:  # a level about to be retrained leaves the record now, not when it is done
        prev = {**prev, "per_level": {k: v for k, v in prev["per_level"].items() if float(k) not in levels},
                "commands": [{**c, "levels": [q for q in c["levels"] if q not in levels]}
                             for c in report._noise_commands(prev)]}
    per_level = {}
    # the calibrated level first, and the results written after every level: a sweep stopped
    # early still leaves the levels it finished
    for p in sorted(levels, key=lambda p: (p != CALIBRATED_NOISE, p)):
        print(f"noise: pair_noise = {p:g}", flush=True)
        size_p = copy.deepcopy(size)
        size_p["train"]["pair_noise"] = p
        per_level[f"{p:g}"] = run_table(out / "noise" / f"p{p:g}", size_p, jobs=args.jobs, specs=specs, tuned=tuned)
        now = {"command": command, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
               "seconds": time.time() - t0, "levels": [q for q in levels if f"{q:g}" in per_level]}
        results = {"size": size, "tuned": tuned, **_joined(prev, per_level, [now])}
        (out / "noise.json").write_text(json.dumps(results, indent=1))
        if len(results["levels"]) >= 2:
            report.write_noise(results, out)
    print((out / "noise.md").read_text() if len(results["levels"]) >= 2 else
          f"{out / 'noise.json'}: one level; noise.md needs two (add levels, or --merge this file into another sweep)")


def cmd_readme(args) -> None:
    """Copy a finished default run's eval.json to results/default_run.json and its table into the README."""
    ev = json.loads((Path(args.run) / "eval.json").read_text())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "default_run.json").write_text(json.dumps(ev, indent=1))
    report.update_readme("default", report.default_run_markdown(ev))
    print(report.default_run_markdown(ev))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in (("claims", cmd_claims, "train and judge every method x seed; claims, table, grid, curves"),
                            ("table", cmd_claims, "the same as claims (its earlier name)"),
                            ("sweep", cmd_sweep, "lr/beta per method on the validation measure -> sweep.json/md"),
                            ("frontier", cmd_frontier, "SSPO per loser-sampling setting: cost vs DPO and final quality"),
                            ("noise", cmd_noise, "SFT / DPO / SSPO vs the share of swapped preference pairs")):
        c = sub.add_parser(name, help=help_)
        c.set_defaults(fn=fn)
        c.add_argument("--quick", action="store_true", help="CI smoke size (tiny base, few updates; numbers meaningless)")
        c.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                       help="runs in parallel worker processes, one torch thread each")
        c.add_argument("--out", default="results", help="output folder")
        if fn is cmd_frontier:
            c.add_argument("--seeds", type=int, help="training seeds per setting (default 3; quick 2)")
            c.add_argument("--settings", nargs="+", choices=list(loser_frontier.FRONTIER), help="subset of settings (the first, the digits preset's, always runs: the others are judged against it)")
        if fn is cmd_noise:
            c.add_argument("--seeds", type=int, help="training seeds per method and level (default 3; quick 2)")
            c.add_argument("--levels", type=float, nargs="+", help=f"pair_noise levels (default {NOISE_LEVELS})")
            c.add_argument("--merge", help="another noise.json (same sizes and lr/beta): join its levels into "
                                           "<out>/noise.json, no training")
        if fn is cmd_sweep:
            c.add_argument("--pair-noise", type=float, default=0.0,
                           help="share of swapped preference pairs; writes sweep_p<noise>.json/md")
            c.add_argument("--methods", nargs="+", choices=sorted({m["method"] for m in METHODS.values() if m}),
                           help="subset of methods (default all)")
        if fn in (cmd_claims, cmd_noise):
            c.add_argument("--sweep", help="a sweep's choice of lr/beta, e.g. results/sweep_p0.2.json "
                                           "(default results/sweep.json; methods it lacks take sweep.json's)")
        if fn is cmd_claims:
            c.add_argument("--pair-noise", type=float, default=0.0,
                           help=f"share of swapped preference pairs ({CALIBRATED_NOISE} = Pick-a-Pic's agreement)")
            c.add_argument("--seeds", type=int, help="number of training seeds (default 3; quick 2)")
            c.add_argument("--steps", type=int, help="optimizer updates per method (same for all)")
            c.add_argument("--methods", nargs="+", choices=list(METHODS), help="subset of methods (default all)")
            c.add_argument("--keep-checkpoints", action="store_true", help="keep runs/*/checkpoints")
            c.add_argument("--from-json", help="a table.json of a finished run: rewrite claims, tables and "
                                               "pictures from it without training")
            c.add_argument("--calibrated", nargs="+",
                           help="noise.json and/or table.json files of runs at pair_noise = "
                                f"{CALIBRATED_NOISE}: their claims become the main condition")
            c.add_argument("--long", help="a table.json of long runs (--steps 1200 --curve-points 12): "
                                          "their claims get a section of their own")
            c.add_argument("--curve-points", type=int, help="checkpoints judged for the learning curves (default 6)")
    c = sub.add_parser("readme", help="the default run's eval.json -> results/default_run.json and the README table")
    c.set_defaults(fn=cmd_readme)
    c.add_argument("--run", default="runs/digits_sspo", help="a finished `python train.py` run")
    c.add_argument("--out", default="results", help="output folder")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in every report's header
    args.fn(args)


if __name__ == "__main__":
    main()
