"""The benchmark runner: trains and evaluates many runs on the embedded digits task, and writes
the results table and curves into results/. It sits on top of everything (it imports the
entry point train.py and the evaluation), and nothing imports it.

    python benchmark.py table [--quick] [--seeds N] [--jobs 2] [--out results/]
    python benchmark.py frontier [--quick] [--seeds N] [--jobs N] [--out results/]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import config
import digits
import models
import train
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent

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
    points = [(0, base_point)]
    for ckpt in _checkpoints_for_curve(run_dir, size["curve_points"]):
        models.load_trainable(bundle, load_file(str(ckpt / "trainable.safetensors")))
        points.append((int(ckpt.name.split("_")[1]), digits.evaluate_model(
            bundle, judge, n_per_condition=size["n_curve"], num_inference_steps=size["curve_inference_steps"],
            seed=seed, conditions=CURVE_CONDITIONS)))
    return points


def _ssr_curve(run_dir: Path) -> list:
    """[(update, ssr_rate)] from metrics.jsonl (empty for methods without SSR)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [(r["step"], r["ssr_rate"]) for r in rows if r.get("ssr_rate") is not None]


def _run_one(name: str, overrides: dict, seed: int, out: Path, size: dict, common: dict, base_curve: dict,
             keep_checkpoints: bool, threads: int = 0) -> dict:
    """Train one (method, seed) with train.run and judge its final model and checkpoints."""
    if threads:
        torch.set_num_threads(threads)
    judge = digits.DigitsJudge.from_splits()  # deterministic fit: every worker process has the same judge
    run_dir = out / "runs" / name.replace(" ", "_").replace("=", "-") / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    t0 = time.time()
    run_dir = Path(train.run({**common, **overrides, "seed": seed, "out_dir": str(run_dir),
                              "sample_every": 0}))
    train_s = time.time() - t0
    bundle = models.build_model("digits", path=str(run_dir / "final"))
    final = digits.evaluate_model(bundle, judge, n_per_condition=size["n_final"],
                                  num_inference_steps=size["inference_steps"], seed=seed)
    row = {"seed": seed, "train_seconds": train_s, "final": final,
           "curve": _curve(bundle, run_dir, judge, size, seed, base_curve), "ssr": _ssr_curve(run_dir)}
    if not keep_checkpoints:  # ~12 MB each (weights + optimizer); final/ and metrics.jsonl stay
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print(f"{name} seed {seed}: {train_s:.0f}s train, " +
          ", ".join(f"{k}={v:.3f}" for k, v in final.items() if k.endswith("accuracy")), flush=True)
    return row


def run_table(out: Path, size: dict, methods=None, keep_checkpoints: bool = False, jobs: int = 1,
              specs: dict | None = None) -> dict:
    """Train every method for every seed with train.run, judge the final models and the
    checkpoints (learning curves). Generation seed = training seed: all methods see the same noise.
    jobs > 1 runs (method, seed) pairs in that many worker processes with one torch thread each
    (on a small CPU, two single-thread runs side by side beat one two-thread run).
    specs: name -> train.run overrides (None = not trained: the base); default METHODS."""
    specs = METHODS if specs is None else specs
    out.mkdir(parents=True, exist_ok=True)
    judge = digits.DigitsJudge.from_splits()
    print(f"judge accuracy on real eval digits: {judge.real_accuracy:.4f}", flush=True)
    common = {k: v for k, v in size["train"].items() if v is not None}
    cfg = config.resolve(common)
    base_dir = digits.ensure_base(cfg.cache_dir, cfg.digits_base_steps, cfg.digits_corrupt)
    base = models.build_model("digits", path=str(base_dir))
    base_final, base_curve = {}, {}
    for seed in range(size["seeds"]):
        base_final[seed] = digits.evaluate_model(base, judge, n_per_condition=size["n_final"],
                                                 num_inference_steps=size["inference_steps"], seed=seed)
        base_curve[seed] = digits.evaluate_model(base, judge, n_per_condition=size["n_curve"], seed=seed,
                                                 num_inference_steps=size["curve_inference_steps"],
                                                 conditions=CURVE_CONDITIONS)
    results = {"size": size, "judge_accuracy": judge.real_accuracy, "base_model": str(base_dir), "runs": {}}
    names = list(methods or specs)
    todo = [(n, s) for n in names if specs[n] is not None for s in range(size["seeds"])]
    args = {key: (key[0], specs[key[0]], key[1], out, size, common, base_curve[key[1]], keep_checkpoints)
            for key in todo}
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
                done[(name, seed)] if specs[name] is not None else
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


def update_readme(marker: str, text: str, readme: Path = ROOT / "README.md") -> None:
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
    write_table_md(results, summary, out / "table.md", "python benchmark.py " + " ".join(sys.argv[1:]))
    plot_curves(results, out)
    if args.readme:
        update_readme("table", (out / "table.md").read_text().replace("# Digits results\n", "", 1))
    print((out / "table.md").read_text())
    print(f"wrote {out / 'table.md'}, table.json, curve_*.png, ssr_rate.png in {results['seconds'] / 60:.1f} min")


# ----------------------------------------------------------------------------- loser sampling frontier

def _losers(scheduler: str, steps: int, guidance: float, every: int) -> dict:
    return {"method": "sspo", "loser_scheduler": scheduler, "loser_steps": steps,
            "loser_guidance": guidance, "loser_every": every}


# SSPO with each loser-sampling setting (scheduler x steps x guidance x regeneration interval).
# The first is the digits preset (today's default); the UniPC-6 settings are the SD-1.5 preset's
# choice at digits' guidance scale.
FRONTIER = {
    "ddim 10, cfg 3, every 1": _losers("ddim", 10, 3.0, 1),
    "dpmsolver++ 10, cfg 3, every 1": _losers("dpmsolver++", 10, 3.0, 1),
    "euler 10, cfg 3, every 1": _losers("euler", 10, 3.0, 1),
    "unipc 6, cfg 3, every 1": _losers("unipc", 6, 3.0, 1),
    "unipc 6, no cfg, every 1": _losers("unipc", 6, 1.0, 1),
    "ddim 10, cfg 3, every 4": _losers("ddim", 10, 3.0, 4),
    "unipc 6, cfg 3, every 4": _losers("unipc", 6, 3.0, 4),
    "dpmsolver++ 4, cfg 3, every 4": _losers("dpmsolver++", 4, 3.0, 4),
}
FRONTIER_SIZES = {
    "full": dict(SIZES["full"], seeds=3, train={"max_steps": 300, "batch_size": 16}),
    # save_every 4: a multiple of every loser_every above
    "quick": dict(SIZES["quick"], seeds=2, train={**SIZES["quick"]["train"], "max_steps": 8, "save_every": 4}),
}
FRONTIER_CONDITIONS = ("id_cfg", "ood_cfg")


def frontier_costs(specs: dict, batch: int, repeats: int, log=print) -> dict:
    """name -> {ratio, q1, q3, sspo_ms, dpo_ms}: a full SSPO update (loop.update, per update of
    one loser_every cycle, reference reloaded at each cycle) over a Diffusion-DPO update, digits,
    full fine-tuning, timed round-robin in one process as bench.py does (one torch thread)."""
    import bench
    from bench_harness import Harness
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = dict(bench.profile("digits", cuda=False, quick=False), batch=batch, warmup=1, repeats=repeats)
        h = Harness("digits", False, p, torch.device("cpu"), storages=("memory",))
        count = iter(range(10**9))
        losers = {n: {"scheduler": o["loser_scheduler"], "steps": o["loser_steps"],
                      "guidance": o["loser_guidance"], "every": o["loser_every"]} for n, o in specs.items()}
        fns = {"dpo": lambda: h.cycle("dpo", losers[next(iter(losers))], next(count))}
        fns.update({n: (lambda n=n: h.cycle("sspo", losers[n], next(count))) for n in specs})
        # one Run per loser setting: the harness keeps one, so rebuild it whenever the setting changes
        def fresh(fn, n):
            def call():
                if getattr(h, "_loop_setting", None) != n:
                    h.__dict__.pop("_loop_run", None)
                    h._loop_setting = n
                return fn()
            return call
        fns = {n: fresh(fn, n) for n, fn in fns.items()}
        times = bench.measure(fns, p["warmup"], p["repeats"], log=log)
    finally:
        torch.set_num_threads(threads)
    dpo = float(np.median(times["dpo"]))
    out = {}
    for n in specs:
        per_update = np.asarray(times[n]) / losers[n]["every"]
        q1, med, q3 = np.percentile(per_update / dpo, [25, 50, 75])
        out[n] = {"ratio": float(med), "q1": float(q1), "q3": float(q3),
                  "sspo_ms": float(np.median(per_update)), "dpo_ms": dpo}
    return out


def write_frontier(results: dict, out: Path, command: str) -> None:
    """loser_frontier.md (table) and loser_frontier.png (accuracy and FD against cost ratio)."""
    size, summary, costs = results["size"], results["summary"], results["costs"]
    L = ["# Loser sampling: the quality-cost frontier on digits\n",
         f"`{command}` — {results['date']}; {size['seeds']} seeds; train overrides "
         f"{json.dumps(size['train'])}; {size['n_final']} generated digits per condition, "
         f"{size['inference_steps']} DDIM steps, guidance 3 for evaluation.\n",
         "cost = full SSPO update (loop.update: swap + loser generation + training pass, per update "
         "of a loser_every cycle) / Diffusion-DPO update, digits, full fine-tuning, batch "
         f"{results['cost_batch']}, median of {results['cost_repeats']} round-robin repeats "
         "[q1, q3]. acc / FD: final judge accuracy and Frechet distance, mean ± std over seeds.\n",
         "| setting (scheduler, steps, guidance, regenerated every) | cost vs DPO | "
         + " | ".join(f"{c} acc | {c} FD" for c in FRONTIER_CONDITIONS) + " |",
         "|" + "---|" * (2 + 2 * len(FRONTIER_CONDITIONS))]
    for name, c in costs.items():
        cells = [f"{summary[name][f'{cond}/{k}'][0]:.3f} ± {summary[name][f'{cond}/{k}'][1]:.3f}"
                 for cond in FRONTIER_CONDITIONS for k in ("accuracy", "frechet")]
        L.append(f"| {name} | {c['ratio']:.2f} [{c['q1']:.2f}, {c['q3']:.2f}] | " + " | ".join(cells) + " |")
    (out / "loser_frontier.md").write_text("\n".join(L) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric in zip(axes, ("accuracy", "frechet")):
        for i, (name, c) in enumerate(costs.items()):
            m, sd = summary[name][f"{FRONTIER_CONDITIONS[0]}/{metric}"]
            ax.errorbar(c["ratio"], m, yerr=sd, xerr=[[c["ratio"] - c["q1"]], [c["q3"] - c["ratio"]]],
                        fmt="o", capsize=3, color=plt.cm.tab10(i % 10), label=name)
        ax.set_xlabel("full SSPO update / Diffusion-DPO update (time)")
        ax.set_ylabel(f"final {metric} ({FRONTIER_CONDITIONS[0]}; mean ± std over seeds)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loser_frontier.png", dpi=110)
    plt.close(fig)


def cmd_frontier(args) -> None:
    size = copy.deepcopy(FRONTIER_SIZES["quick" if args.quick else "full"])
    if args.seeds is not None:
        size["seeds"] = args.seeds
    specs = {n: FRONTIER[n] for n in (args.settings or FRONTIER)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    batch, repeats = size["train"]["batch_size"], (3 if args.quick else 7)
    costs = frontier_costs(specs, batch, repeats, log=lambda s: print(s, flush=True))
    runs = len(specs) * size["seeds"]
    train_s = sum(c["sspo_ms"] for c in costs.values()) / 1e3 * size["train"]["max_steps"] * size["seeds"]
    print(f"frontier: {len(specs)} settings x {size['seeds']} seeds = {runs} runs of "
          f"{size['train']['max_steps']} updates; expected duration ~{train_s / max(args.jobs, 1) / 60 * 1.5:.0f} min "
          f"with --jobs {args.jobs} (training time from the costs just measured at one thread, "
          f"+50% for evaluation)", flush=True)
    results = run_table(out / "frontier", size, keep_checkpoints=False, jobs=args.jobs, specs=specs)
    results.update(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), seconds=time.time() - t0,
                   costs=costs, cost_batch=batch, cost_repeats=repeats, summary=summarize(results))
    (out / "loser_frontier.json").write_text(json.dumps(results, indent=1))
    write_frontier(results, out, "python benchmark.py " + " ".join(sys.argv[1:]))
    print((out / "loser_frontier.md").read_text())
    print(f"wrote {out / 'loser_frontier.md'}, loser_frontier.png, loser_frontier.json in "
          f"{results['seconds'] / 60:.1f} min")


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
    f = sub.add_parser("frontier", help="SSPO per loser-sampling setting on digits: cost vs DPO and final "
                                         "quality; write loser_frontier.md/png/json")
    f.add_argument("--quick", action="store_true", help="CI smoke size (tiny base, 8 updates, 2 seeds)")
    f.add_argument("--seeds", type=int, help="training seeds per setting (default 3; quick 2)")
    f.add_argument("--settings", nargs="+", choices=list(FRONTIER), help="subset of settings (default all)")
    f.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="(setting, seed) runs in parallel worker processes, one torch thread each")
    f.add_argument("--out", default="results", help="output folder")
    args = p.parse_args(argv)
    if args.cmd == "table":
        cmd_table(args)
    elif args.cmd == "frontier":
        cmd_frontier(args)


if __name__ == "__main__":
    main()
