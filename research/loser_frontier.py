"""The loser-sampling frontier (issue: the cost of self-sampling): SSPO on digits for each
setting of scheduler x steps x guidance x regeneration interval, its full-step cost against a
Diffusion-DPO step (measured through loop.update) and its final quality. research/benchmark.py runs it
(`python -m research.benchmark frontier`); this module holds the settings, the cost measurement and the report.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

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
    "unipc 4, cfg 3, every 1": _losers("unipc", 4, 3.0, 1),
    "dpmsolver++ 4, cfg 3, every 1": _losers("dpmsolver++", 4, 3.0, 1),
    "unipc 3, cfg 3, every 1": _losers("unipc", 3, 3.0, 1),
    "unipc 6, cfg 3, every 2": _losers("unipc", 6, 3.0, 2),
    "ddim 10, cfg 3, every 4": _losers("ddim", 10, 3.0, 4),
    "unipc 6, cfg 3, every 4": _losers("unipc", 6, 3.0, 4),
    "dpmsolver++ 4, cfg 3, every 4": _losers("dpmsolver++", 4, 3.0, 4),
}
CONDITIONS = ("id_cfg", "ood_cfg")


def selected(names: list[str] | None) -> dict:
    """The settings to run: ``names`` (all when None), with the reference setting (the digits
    preset's, the first of FRONTIER) always among them, since ``held`` compares with it."""
    default = next(iter(FRONTIER))
    return {n: FRONTIER[n] for n in ([default] + [n for n in (names or FRONTIER) if n != default])}


def cheapest_held(summary: dict, costs: dict, default: str) -> str | None:
    """The setting with the lowest cost ratio among those that hold the default's quality
    (``held``), or None when no other setting does."""
    ok = [n for n in costs if n != default and n in summary and held(summary, n, default)]
    return min(ok, key=lambda n: costs[n]["ratio"]) if ok else None


def held(summary: dict, name: str, default: str) -> bool:
    """Does setting ``name`` hold the digits results of ``default`` (the issue's rule)? For every
    condition: mean accuracy >= the default's mean - its seed std, and mean Frechet distance <=
    the default's mean + its seed std (inside the default's seed spread, or better)."""
    ok = True
    for cond in CONDITIONS:
        (acc, _), (ref_acc, ref_acc_sd) = summary[name][f"{cond}/accuracy"], summary[default][f"{cond}/accuracy"]
        (fd, _), (ref_fd, ref_fd_sd) = summary[name][f"{cond}/frechet"], summary[default][f"{cond}/frechet"]
        ok &= acc >= ref_acc - ref_acc_sd and fd <= ref_fd + ref_fd_sd
    return bool(ok)


def costs(specs: dict, batch: int, repeats: int, log=print) -> dict:
    """name -> {ratio, q1, q3, sspo_ms, dpo_ms}: a full SSPO update (loop.update, per update of
    one loser_every cycle, reference reloaded at each cycle) over a Diffusion-DPO update, digits,
    full fine-tuning, timed round-robin in one process as research/bench.py does (one torch thread)."""
    from research import bench
    from research.bench_harness import Harness
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


def write(results: dict, out: Path, command: str) -> None:
    """loser_frontier.md (table) and loser_frontier.png (accuracy and FD against cost ratio)."""
    size, summary, costs = results["size"], results["summary"], results["costs"]
    default = next(iter(FRONTIER))  # the digits preset's loser sampling
    if default not in summary:
        raise ValueError(f"the frontier needs its reference setting {default!r} to say what holds quality")
    L = ["# Loser sampling: the quality-cost frontier on digits\n",
         f"`{command}` — {results['date']}; {size['seeds']} seeds; train overrides "
         f"{json.dumps(size['train'])}; {size['n_final']} generated digits per condition, "
         f"{size['inference_steps']} DDIM steps, guidance 3 for evaluation; SSPO lr/beta "
         f"{json.dumps(results.get('tuned', {}).get('sspo') or 'of the digits preset')}.\n",
         "cost = full SSPO update (loop.update: swap + loser generation + training pass, per update "
         "of a loser_every cycle) / Diffusion-DPO update, digits, full fine-tuning, batch "
         f"{results['cost_batch']}, median of {results['cost_repeats']} round-robin repeats "
         "[q1, q3]. acc / FD: final judge accuracy and Frechet distance, mean ± std over seeds. "
         f"held: every acc >= {default}'s mean - std and every FD <= its mean + std "
         "(frontier.held: inside the digits preset's seed spread, or better).\n",
         "| setting (scheduler, steps, guidance, regenerated every) | cost vs DPO | "
         + " | ".join(f"{c} acc | {c} FD" for c in CONDITIONS) + " | held |",
         "|" + "---|" * (3 + 2 * len(CONDITIONS))]
    for name, c in costs.items():
        cells = [f"{summary[name][f'{cond}/{k}'][0]:.3f} ± {summary[name][f'{cond}/{k}'][1]:.3f}"
                 for cond in CONDITIONS for k in ("accuracy", "frechet")]
        ok = "preset" if name == default else ("yes" if held(summary, name, default) else "no")
        L.append(f"| {name} | {c['ratio']:.2f} [{c['q1']:.2f}, {c['q3']:.2f}] | " + " | ".join(cells) + f" | {ok} |")
    choice = cheapest_held(summary, costs, default)
    L.append("\nCheapest setting that holds the digits preset's quality: " + (
        f"**{choice}**, {costs[choice]['ratio']:.2f}x a DPO update against {costs[default]['ratio']:.2f}x for "
        f"{default}." if choice else f"none; only {default} itself."))
    (out / "loser_frontier.md").write_text("\n".join(L) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # one panel per condition x metric; the band is the preset's seed spread (mean ± std), the
    # rule ``held`` applies; settings that do not hold it are drawn hollow
    fig, axes = plt.subplots(len(CONDITIONS), 2, figsize=(14, 4.6 * len(CONDITIONS)), squeeze=False)
    for row, cond in zip(axes, CONDITIONS):
        for ax, metric in zip(row, ("accuracy", "frechet")):
            ref_m, ref_sd = summary[default][f"{cond}/{metric}"]
            ax.axhspan(ref_m - ref_sd, ref_m + ref_sd, color="0.85", zorder=0)
            for k, (name, c) in enumerate(costs.items()):
                m, sd = summary[name][f"{cond}/{metric}"]
                ok = name == default or held(summary, name, default)
                color = plt.cm.tab20(k % 20)
                ax.errorbar(c["ratio"], m, yerr=sd, xerr=[[c["ratio"] - c["q1"]], [c["q3"] - c["ratio"]]],
                            fmt="s" if name == default else "o", capsize=3, color=color, ms=7,
                            mfc=color if ok else "white", label=name + ("" if ok else " (not held)"))
            ax.set_xlabel("full SSPO update / Diffusion-DPO update (time)")
            ax.set_ylabel(f"final {'accuracy (higher is better)' if metric == 'accuracy' else 'Frechet distance (lower is better)'}")
            ax.set_title(f"{cond}; grey band: {default} mean ± std over seeds", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.savefig(out / "loser_frontier.png", dpi=100)
    plt.close(fig)


