"""From benchmark results to what a reader sees: the paper's claims with a verdict each, the
labelled sample grid and the learning curves (research/benchmark.py runs; this module only reads results).

Each claim compares two groups of runs over the same seeds (paired: seed s of method A and seed
s of method B align the same base, see the same data order and are judged on the same noise).
The verdict rule (``verdict``) reads the paired differences d_s = A_s - B_s (sign chosen so that
the claim says d > 0):

    mean d  +-  t_{0.975, n-1} * sd(d) / sqrt(n)          (a 95% t-interval over seeds)
    supported      the whole interval lies above 0
    not supported  the whole interval lies below 0 (the opposite holds)
    inconclusive   the interval contains 0 (the difference is within the noise)

With 3 seeds t_{0.975,2} = 4.30: only differences that are large against their seed-to-seed
spread count. Memorization is measured directly (``memorization``): the distance of each sample
to its nearest alignment-split image against the distance to its nearest image in an equally
large held-out set of real digits, and the spread of samples drawn for the same prompt.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Two-sided 95% Student-t quantiles by degrees of freedom (scipy.stats.t.ppf(0.975, df)).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t_quantile(df: int) -> float:
    if df < 1:
        raise ValueError(f"need at least 2 paired seeds for an interval, got df={df}")
    return T975.get(df) or T975[max(k for k in T975 if k <= df)]  # conservative between table rows


def interval(diffs) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% t-interval of the mean of paired differences."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2 or not np.isfinite(d).all():
        raise ValueError(f"need >= 2 finite paired differences, got {d.tolist()}")
    half = t_quantile(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def verdict(diffs) -> str:
    """'supported' / 'not supported' / 'inconclusive' for the claim "the difference is > 0"."""
    _, low, high = interval(diffs)
    if low > 0:
        return "supported"
    if high < 0:
        return "not supported"
    return "inconclusive"


def seeds_needed(diffs, limit: int = 1000) -> int | None:
    """Paired seeds the 95% t-interval would need to exclude 0 if the observed mean difference
    and its spread held: the smallest n with t(n-1) sd / sqrt(n) < |mean|; None for a zero mean
    or beyond ``limit``."""
    d = np.asarray(diffs, dtype=np.float64)
    mean, sd = abs(float(d.mean())), float(d.std(ddof=1))
    if mean == 0:
        return None
    for n in range(2, limit + 1):
        if t_quantile(n - 1) * sd / math.sqrt(n) < mean:
            return n
    return None


REALISM_RATIO = 1.5  # an accuracy win whose Frechet distance is more than this times the other's is a trade-off


def realism_verdict(accuracy_verdict: str, fd_a: float, fd_b: float, ratio: float = REALISM_RATIO) -> str:
    """The verdict on "A is more accurate than B" with realism in it: a side that wins on
    accuracy (``accuracy_verdict`` 'supported': A; 'not supported': B) while its mean Frechet
    distance to real digits is more than ``ratio`` times the other's draws shapes less like real
    digits, which a PickScore-like judgment would not call a win: 'trade-off', never
    'supported'. Otherwise the accuracy verdict stands."""
    winner_fd, other_fd = {"supported": (fd_a, fd_b), "not supported": (fd_b, fd_a)}.get(accuracy_verdict, (0, 0))
    if other_fd > 0 and winner_fd > ratio * other_fd:
        return "trade-off"
    return accuracy_verdict


# ----------------------------------------------------------------------------- memorization

def _nearest(x: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """(N,...) samples, (M,...) references -> (N,) Euclidean distance to the nearest reference."""
    return torch.cdist(x.flatten(1).double(), refs.flatten(1).double()).min(dim=1).values


def memorization(samples: torch.Tensor, labels, align: torch.Tensor, heldout: torch.Tensor) -> dict:
    """Copying and diversity of generated digits.

    samples (N,1,8,8) generated for prompted ``labels`` (N,); align (M,1,8,8) the alignment split
    the model was trained on; heldout (M,1,8,8) real digits it never saw, as many as ``align``
    (nearest-neighbour distances shrink with the reference set's size, so sizes must match).
    nn_ratio = mean_i d(x_i, align) / d(x_i, heldout): ~1 for a model that generalises, well
    below 1 for one that copies its alignment set. diversity = mean pairwise distance between
    samples of the same prompted digit (lower = more collapsed).
    """
    if len(align) != len(heldout):
        raise ValueError(f"align ({len(align)}) and heldout ({len(heldout)}) must be equally large")
    ratio = (_nearest(samples, align) / _nearest(samples, heldout).clamp_min(1e-12)).mean()
    labels = np.asarray(labels)
    spreads = []
    for c in np.unique(labels):
        group = samples[torch.from_numpy(labels == c)].flatten(1).double()
        if len(group) > 1:
            d = torch.cdist(group, group)
            spreads.append(d.sum() / (len(group) * (len(group) - 1)))
    return {"nn_ratio": float(ratio), "diversity": float(torch.stack(spreads).mean())}


# ----------------------------------------------------------------------------- the claims table

def claim_row(name: str, measure: str, a: str, b: str, values_a, values_b, higher_is_better: bool = True,
              frechet: tuple | None = None) -> dict:
    """One claim "a beats b on measure" from per-seed values (paired by seed). ``frechet``:
    (per-seed FD of a, of b) for an accuracy claim, judged by :func:`realism_verdict`."""
    va, vb = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    diffs = (va - vb) if higher_is_better else (vb - va)
    mean, low, high = interval(diffs)
    row = {"claim": name, "measure": measure, "a": a, "b": b,
           "a_mean": float(va.mean()), "a_std": float(va.std(ddof=1)),
           "b_mean": float(vb.mean()), "b_std": float(vb.std(ddof=1)),
           "diff": mean, "low": low, "high": high, "verdict": verdict(diffs), "seeds": len(diffs)}
    if row["verdict"] == "inconclusive":
        row["seeds_needed"] = seeds_needed(diffs)
    if frechet is not None:
        row["fd_a"], row["fd_b"] = float(np.mean(frechet[0])), float(np.mean(frechet[1]))
        row["verdict"] = realism_verdict(row["verdict"], row["fd_a"], row["fd_b"])
    return row


def claims_markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| claim | measure | A (mean ± sd) | B (mean ± sd) | A better by (95% CI) | verdict |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        need = r.get("seeds_needed", 0)
        note = "" if "seeds_needed" not in r else (f" (~{need} seeds would decide it)" if need else " (no effect seen)")
        fd = lambda k: f" (FD {r[k]:.2f})" if k in r else ""  # noqa: E731
        lines.append(f"| {r['claim']} | {r['measure']} | {r['a']}: {r['a_mean']:.3f} ± {r['a_std']:.3f}{fd('fd_a')} | "
                     f"{r['b']}: {r['b_mean']:.3f} ± {r['b_std']:.3f}{fd('fd_b')} | {r['diff']:+.3f} "
                     f"[{r['low']:+.3f}, {r['high']:+.3f}] | **{r['verdict']}**{note} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- a grid a person can read

def labelled_grid(rows: dict[str, torch.Tensor], cell: int = 48, label_w: int = 150) -> Image.Image:
    """rows: method -> (10,1,8,8) samples in [-1,1] for the prompted digits 0..9, in order.
    Returns a grid: one row per method (its name on the left), one column per prompted digit
    (the digit written above), each 8x8 sample scaled to ``cell`` pixels."""
    n = len(rows)
    img = Image.new("L", (label_w + 10 * (cell + 4), 24 + n * (cell + 4)), 255)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)  # scalable (Pillow >= 10.1); the bitmap default drops spaces
    for c in range(10):
        draw.text((label_w + c * (cell + 4) + cell // 2 - 3, 4), str(c), fill=0, font=font)
    for r, (name, x) in enumerate(rows.items()):
        y = 24 + r * (cell + 4)
        draw.text((4, y + cell // 2 - 7), name, fill=0, font=font)
        for c in range(min(10, len(x))):
            px = ((x[c, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            tile = Image.fromarray(255 - px).resize((cell, cell), Image.NEAREST)  # dark ink on white
            img.paste(tile, (label_w + c * (cell + 4), y))
    return img


# ----------------------------------------------------------------------------- the paper's claims

def _final(results: dict, name: str, key: str) -> list[float]:
    return [r["final"][key] for r in results["runs"][name]]


def _curve_values(run: dict, key: str) -> list[float]:
    return [m[key] for _, m in run["curve"]]


def _late_gain(run: dict, key: str = "id_nocfg/accuracy") -> float:
    """Accuracy gained over the second half of training (final - midpoint of the curve)."""
    v = _curve_values(run, key)
    return v[-1] - v[len(v) // 2]


def _late_drop(run: dict, key: str = "id_nocfg/accuracy") -> float:
    """How far the final point fell below the curve's best (overfitting as training grows)."""
    v = _curve_values(run, key)
    return max(v) - v[-1]


def _roughness(run: dict, key: str = "id_nocfg/accuracy") -> float:
    """Std of successive changes along the curve (fluctuation; lower = more stable)."""
    v = np.diff(_curve_values(run, key))
    return float(v.std()) if len(v) > 1 else 0.0


def _ssr_rise(run: dict) -> float:
    """Mean SSR rate over the last third of training minus over the first third."""
    v = [r for _, r in run["ssr"]]
    k = max(1, len(v) // 3)
    return float(np.mean(v[-k:]) - np.mean(v[:k]))


def build_claims(results: dict) -> list[dict]:
    """One row per claim of the SSPO paper (and SDPO's abstract) that the digits runs can test."""
    runs, rows = results["runs"], []

    def per_run(name, fn):
        return [fn(r) for r in runs[name]]

    def add(claim, measure, a, b, va, vb, higher=True, cond=None):
        """``cond``: the condition of an accuracy claim, whose Frechet distances judge realism."""
        fd = (_final(results, a, f"{cond}/frechet"), _final(results, b, f"{cond}/frechet")) \
            if cond and b in runs else None
        rows.append(claim_row(claim, measure, a, b, va, vb, higher, frechet=fd))

    have = lambda *names: all(n in runs for n in names)  # noqa: E731
    # Accuracy is judged with guidance 3 (as the paper samples) and without: with guidance most
    # methods reach 0.95-1.0 on digits, a ceiling that hides differences, so both are shown.
    guid = {"cfg": "guidance 3", "nocfg": "no guidance"}
    for split, where in (("id", "training templates"), ("ood", "held-out templates")):
        for g in guid:
            cond = f"{split}_{g}"
            for other in ("sft", "dpo", "spin", "base"):
                if have("sspo", other):
                    add(f"Table 1: SSPO beats {other} ({where}, {guid[g]})", f"{cond} accuracy", "sspo", other,
                        _final(results, "sspo", f"{cond}/accuracy"), _final(results, other, f"{cond}/accuracy"),
                        cond=cond)
    if have("sspo", "sft"):
        add("Table 1: SSPO keeps closer to real digits than SFT", "id_cfg Frechet distance", "sspo", "sft",
            _final(results, "sspo", "id_cfg/frechet"), _final(results, "sft", "id_cfg/frechet"), higher=False)
    for g in guid:
        acc = f"id_{g}/accuracy"
        for other in ("sspo ssr=none", "sspo replay=initial", "sspo replay=last"):
            if have("sspo", other):
                add(f"Table 6: SSPO beats {other} ({guid[g]})", f"id_{g} accuracy", "sspo", other,
                    _final(results, "sspo", acc), _final(results, other, acc), cond=f"id_{g}")
        if have("sspo ssr=indicator", "sspo ssr=none"):
            add(f"Table 6: indicator SSR beats no SSR ({guid[g]})", f"id_{g} accuracy", "sspo ssr=indicator",
                "sspo ssr=none", _final(results, "sspo ssr=indicator", acc), _final(results, "sspo ssr=none", acc),
                cond=f"id_{g}")
    if have("sspo", "sspo replay=last"):
        add("Fig. 2: last-checkpoint replay overfits as training grows (drops more from its best)",
            "best - final id_nocfg accuracy", "sspo replay=last", "sspo",
            per_run("sspo replay=last", _late_drop), per_run("sspo", _late_drop))
    if have("sspo"):
        vals = per_run("sspo", _ssr_rise)
        add("Fig. 4: the SSR rate rises during training", "last third - first third SSR rate", "sspo", "zero",
            vals, [0.0] * len(vals))
    if have("sspo", "sft"):
        add("Fig. 9: SSPO keeps improving while SFT plateaus", "second-half gain, id_nocfg accuracy", "sspo", "sft",
            per_run("sspo", _late_gain), per_run("sft", _late_gain))
        add("Fig. 9: SFT fluctuates more than SSPO", "roughness of the accuracy curve", "sspo", "sft",
            per_run("sspo", _roughness), per_run("sft", _roughness), higher=False)
    if have("sspo small-align", "sft small-align"):
        add("SFT memorizes the alignment set, SSPO does not", "nearest-neighbour ratio (align / held-out)",
            "sspo small-align", "sft small-align", per_run("sspo small-align", lambda r: r["memo"]["nn_ratio"]),
            per_run("sft small-align", lambda r: r["memo"]["nn_ratio"]))
        add("SSPO samples are more diverse than SFT's", "mean within-prompt distance",
            "sspo small-align", "sft small-align", per_run("sspo small-align", lambda r: r["memo"]["diversity"]),
            per_run("sft small-align", lambda r: r["memo"]["diversity"]))
    for other in ("dpo_cm", "sdpo"):
        if have(other, "dpo"):
            for g in guid:
                add(f"SDPO paper: {other} beats Diffusion-DPO ({guid[g]})", f"id_{g} accuracy", other, "dpo",
                    _final(results, other, f"id_{g}/accuracy"), _final(results, "dpo", f"id_{g}/accuracy"),
                    cond=f"id_{g}")
            add(f"SDPO paper: {other} is more stable than Diffusion-DPO", "roughness of the accuracy curve",
                other, "dpo", per_run(other, _roughness), per_run("dpo", _roughness), higher=False)
    return rows


# ----------------------------------------------------------------------------- curves

def _mean_over_seeds(series: list[dict]):
    """Steps common to every seed, and the (seeds, steps) array of values."""
    steps = sorted(set.intersection(*(set(c) for c in series))) if series else []
    return steps, np.array([[c[s] for s in steps] for c in series])


def plot_curves(results: dict, out, conditions=("id_nocfg", "ood_nocfg")) -> list:
    """curve_<metric>.png: metric vs update per method, in/out-of-distribution prompts without
    guidance (paper Fig. 2 / Fig. 9); ssr_rate.png: SSR rate vs update (Fig. 4). Seed means with
    a shaded +- 1 std band over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths, colors = [], plt.cm.tab20(np.linspace(0, 1, 20))
    for metric in ("accuracy", "confidence", "frechet"):
        fig, axes = plt.subplots(1, len(conditions), figsize=(12, 4.5), sharex=True)
        for ax, cond in zip(np.atleast_1d(axes), conditions):
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
            ax.fill_between(steps, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=colors[i % 20], alpha=0.12)
    ax.set_xlabel("update")
    ax.set_ylabel("SSR rate (fraction of pairs with s = +1)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "ssr_rate.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- preference noise

NOISE_CONDITIONS = ("id_cfg", "id_nocfg", "ood_cfg", "ood_nocfg")


def crossover(levels, a_means, b_means) -> float | None:
    """The first noise level at which method a's mean reaches method b's (a - b >= 0), linearly
    interpolated between the two levels around the sign change; ``levels[0]`` if a already
    reaches b there; None if it never does within ``levels``."""
    d = np.asarray(a_means, dtype=np.float64) - np.asarray(b_means, dtype=np.float64)
    if d[0] >= 0:
        return float(levels[0])
    for i in range(1, len(d)):
        if d[i] >= 0:
            return float(levels[i - 1] + (levels[i] - levels[i - 1]) * (-d[i - 1]) / (d[i] - d[i - 1]))
    return None


def noise_summary(results: dict) -> dict:
    """{condition: {method: {"acc": [(mean, sd)] per level, "fd": [...]}}} and the SSPO-vs-DPO
    crossover per condition."""
    levels = results["levels"]
    table = {}
    for cond in NOISE_CONDITIONS:
        table[cond] = {}
        for name in results["per_level"][f"{levels[0]:g}"]["runs"]:
            acc = [_final(results["per_level"][f"{p:g}"], name, f"{cond}/accuracy") for p in levels]
            fd = [_final(results["per_level"][f"{p:g}"], name, f"{cond}/frechet") for p in levels]
            table[cond][name] = {"acc": [(float(np.mean(v)), float(np.std(v, ddof=1))) for v in acc],
                                 "fd": [(float(np.mean(v)), float(np.std(v, ddof=1))) for v in fd]}
    cross = {cond: crossover(levels, [m for m, _ in table[cond]["sspo"]["acc"]],
                             [m for m, _ in table[cond]["dpo"]["acc"]])
             for cond in NOISE_CONDITIONS if {"sspo", "dpo"} <= set(table[cond])}
    return {"table": table, "crossover": cross}


def _noise_commands(results: dict) -> list[dict]:
    """The commands that trained a noise.json's levels (one, or several when levels were added)."""
    return results.get("commands") or [{"command": results.get("command", "?"), "date": results.get("date", "?"),
                                        "seconds": results.get("seconds", 0.0), "levels": results["levels"]}]


def write_noise(results: dict, out: Path) -> None:
    """noise.md (accuracy and FD per method and level, the crossover) and noise.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    levels, summ = results["levels"], noise_summary(results)
    names = {"id_cfg": "training templates, guidance 3", "id_nocfg": "training templates, no guidance",
             "ood_cfg": "held-out templates, guidance 3", "ood_nocfg": "held-out templates, no guidance"}
    lines = ["# Preference noise: SFT, Diffusion-DPO and SSPO vs the share of swapped pairs", "",
             "; ".join(f"`{c['command']}` — {c['date']}, {c['seconds'] / 60:.0f} min (p = "
                       f"{', '.join(f'{p:g}' for p in c['levels'])})" for c in _noise_commands(results))
             + (" (levels trained by separate commands, joined by `noise` itself or `noise --merge`)"
                if len(_noise_commands(results)) > 1 else "")
             + f"; {results['size']['seeds']} seeds per method and level; {json.dumps(results['size']['train'])}; "
             f"lr/beta per method: {'results/sweep.json' if results['tuned'] else 'the preset'}. pair_noise = p "
             "swaps winner and loser of round(p N) alignment pairs, the same items for every method "
             "(SFT and SSPO learn from the swapped winner too); p = 0.2 models Pick-a-Pic's 68.0% "
             "annotator agreement. Accuracy: mean ± sd over seeds (FD: Frechet distance to real digits, "
             "lower is better).", ""]
    for cond, label in names.items():
        c = summ["crossover"].get(cond)
        where = (f"SSPO's mean reaches DPO's at pair_noise = {c:.2f}" if c is not None and c > levels[0]
                 else "SSPO's mean is at or above DPO's already without noise" if c is not None
                 else f"no crossover below {levels[-1]:g}: DPO's mean stays above SSPO's")
        lines += [f"## {label}", "", f"Crossover: {where}.", "",
                  "| method | " + " | ".join(f"p = {p:g}" for p in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for name, row in summ["table"][cond].items():
            cells = [f"{a:.3f} ± {sa:.3f} (FD {f:.2f})" for (a, sa), (f, _) in zip(row["acc"], row["fd"])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / "noise.md").write_text("\n".join(lines))
    fig, axes = plt.subplots(1, len(names), figsize=(18, 4.2), sharey=True)
    for ax, (cond, label) in zip(axes, names.items()):
        for name, row in summ["table"][cond].items():
            m, sd = np.array([a for a, _ in row["acc"]]), np.array([s for _, s in row["acc"]])
            ax.plot(levels, m, marker="o", label=name)
            ax.fill_between(levels, m - sd, m + sd, alpha=0.15)
        ax.axvline(0.2, color="grey", lw=0.8, ls=":")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("pair_noise (share of swapped pairs)")
    axes[0].set_ylabel("accuracy (judge)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "noise.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- tables written into results/ and the README

README = Path(__file__).resolve().parents[1] / "README.md"


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


def accuracy_and_fd_markdown(results: dict, title: str) -> str:
    """One row per method: accuracy (mean ± sd over seeds, the sample sd as in the claims) with its
    mean Frechet distance beside it, in each of the four conditions; for the README's results summary."""
    conds = {"id_cfg": "training templates, guidance 3", "id_nocfg": "training templates, no guidance",
             "ood_cfg": "held-out templates, guidance 3", "ood_nocfg": "held-out templates, no guidance"}
    lines = [title, "", "| method | " + " | ".join(conds.values()) + " |", "|---|" + "---|" * len(conds)]
    for name in results["runs"]:
        acc = {c: _final(results, name, f"{c}/accuracy") for c in conds}  # sd as in the claims (ddof 1)
        lines.append(f"| {name} | " + " | ".join(
            f"{np.mean(acc[c]):.2f} ± {np.std(acc[c], ddof=1):.2f} (FD {np.mean(_final(results, name, f'{c}/frechet')):.1f})"
            for c in conds) + " |")
    return "\n".join(lines)


def update_readme(marker: str, text: str, readme: Path = README) -> None:
    """Replace the block between <!-- results:MARKER --> and <!-- /results:MARKER --> in the
    README with generated text, so the README's numbers always come from a command."""
    src = readme.read_text()
    head, tail = f"<!-- results:{marker} -->", f"<!-- /results:{marker} -->"
    if head not in src or tail not in src:
        raise ValueError(f"{readme} lacks the markers {head} ... {tail}")
    before, rest = src.split(head, 1)
    after = rest.split(tail, 1)[1]
    readme.write_text(f"{before}{head}\n{text.strip()}\n{tail}{after}")


def default_run_markdown(ev: dict) -> str:
    """The README's table of the default run from its eval.json (base vs final, every condition)."""
    rows = [("training templates, guidance 3 (SVC / RandomForest)", "id_cfg/accuracy", "id_cfg/accuracy_rf"),
            ("training templates, no guidance", "id_nocfg/accuracy", None),
            ("held-out templates, guidance 3", "ood_cfg/accuracy", None),
            ("held-out templates, no guidance", "ood_nocfg/accuracy", None),
            ("Frechet distance to real digits, training templates, guidance 3 (lower is better)",
             "id_cfg/frechet", None)]
    fmt = lambda m, k, k2: f"{ev[m][k]:.3f}" + (f" / {ev[m][k2]:.3f}" if k2 and k2 in ev[m] else "")
    lines = ["| prompts | base | after SSPO |", "|---|---|---|"]
    lines += [f"| {label} | {fmt('base', k, k2)} | {fmt('final', k, k2)} |" for label, k, k2 in rows]
    lines += ["", f"The SVC judge's accuracy on real held-out digits: {ev['judge_real_accuracy']:.3f}."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the validation sweep's rule

# A setting whose samples drift this far from real digits (validation Frechet distance over the
# base's) is not admissible, however accurate: on digits, Diffusion-DPO with a large step reaches
# the prompted class with shapes no person would call digits.
SWEEP_MAX_FD_RATIO = 2.0


def choose(rows: list, base_frechet: float, max_ratio: float = SWEEP_MAX_FD_RATIO) -> dict:
    """The sweep's rule for one method's rows: among settings with validation FD <= max_ratio x
    the base's, the highest accuracy (ties -> lower FD); if none is admissible, the lowest FD."""
    ok = [r for r in rows if r["frechet"] <= max_ratio * base_frechet]
    best = (sorted(ok, key=lambda r: (-r["accuracy"], r["frechet"])) if ok
            else sorted(rows, key=lambda r: r["frechet"]))[0]
    return {"lr": best["lr"], "beta": best["beta"], "admissible": bool(ok)}


def write_sweep_md(sweep: dict, path: Path, command: str, validation_seed: int) -> None:
    lines = ["# Settings per method (validation sweep)\n",
             f"`{command}`. Validation measure: accuracy and Frechet distance (FD) to the real *align* "
             f"digits, training templates, no guidance, generation noise seed {validation_seed} (never "
             f"used in evaluation); {sweep['size']['train'].get('max_steps')} updates, seed 0"
             + (f", pair_noise {sweep['size']['train']['pair_noise']:g} (that share of the pairs swapped)"
                if sweep['size']['train'].get('pair_noise') else "") + ". Rule "
             f"(report.choose): among the settings whose FD is at most {sweep['max_fd_ratio']:g}x the "
             f"base's ({sweep['base']['frechet']:.2f}; base accuracy {sweep['base']['accuracy']:.3f}), the "
             "highest accuracy (ties -> lower FD); if none qualifies, the lowest FD (marked `no` below). "
             "SFT has no beta.\n",
             "| method | chosen lr | chosen beta | admissible |", "|---|---|---|---|"]
    lines += [f"| {m} | {b['lr']:g} | {b['beta']:g} | {'yes' if b['admissible'] else 'no'} |"
              for m, b in sweep["best"].items()]
    lines += ["", "| method | lr | beta | validation accuracy | validation FD |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['lr']:g} | {r['beta']:g} | {r['accuracy']:.3f} | {r['frechet']:.2f} |"
              for r in sorted(sweep["rows"], key=lambda r: (r["method"], r["lr"], r["beta"]))]
    path.write_text("\n".join(lines) + "\n")
