"""Where the DPO-C&M / SDPO pair weight acts, per model family at its real latent size: the
weight over t for a range of per-value gaps, and the share of training timesteps at which
each preset's tau masks and eps_clip clips.

    python -m research.pair_weights      # a few seconds of CPU; no model is loaded

Writes ``results/pair_weights.png`` (one panel per family) and ``results/pair_weights.md``.
The weight is ``importance.pair_log_weight`` (this project's reading of the [SDPO] abstract,
derived in importance.py's module docstring) with each family's noise process
(``noise.Process.importance_kappa``), D, temperature, tau, eps_clip and prediction dtype:

    log w = -temperature * kappa_t * D * g,    g = the pair's per-value gap
            ((m_w - r_w) + (m_l - r_l) - drift terms) = -2 (c_w + c_l) of importance.cross_term,

capped at +-60, and 1 where |g| / 2 is within the rounding floor of the predictions
(``importance.rounding_floor`` for unit-variance predictions in the training dtype).

Calibration: tau and eps_clip were chosen on digits (D = 64, float32, beta 500). Per item 3 of
importance.py the weight is exp(c_t (R_w + R_l)) in Diffusion-DPO's implicit rewards, with
c_t = 2 temperature kappa_t D / beta. Each family's temperature makes its c_t equal digits'
at the median over its own training-t density (uniform for DDPM, logit-normal for flows):
the same change of implicit reward moves the weight as much as on digits, where tau and
eps_clip were set. :func:`calibrated_temperature` computes it; the presets hold it rounded.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch

import config
import importance
import noise
from models import cogvideox, sdxl, wan
from models.common import SD15_SCHEDULER

ROOT = Path(__file__).resolve().parents[1]  # the repository
COMMAND = "python -m research.pair_weights"
GAPS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)  # per-value pair gaps g, both signs
W_RANGE = (1e-3, 1e3)            # the plot's weight axis

# name, preset (configs/), scheduler config, real latent shape, prediction dtype in training
FAMILIES = (
    ("digits", "digits", dict(SD15_SCHEDULER, _class_name="DDPMScheduler"), (1, 8, 8), torch.float32),
    ("SD-1.5, 512 px", "sd15_pickapic", SD15_SCHEDULER, (4, 64, 64), torch.bfloat16),
    ("SDXL, 1024 px", "sdxl_pickapic", sdxl.SCHEDULER, (4, 128, 128), torch.bfloat16),
    ("AnimateDiff, 16 x 256 px", "animatediff_magictime", SD15_SCHEDULER, (4, 16, 32, 32), torch.bfloat16),
    ("CogVideoX-2B, 49 x 480x720", "cogvideox_sdpo", cogvideox.SCHEDULER, (16, 13, 60, 90), torch.bfloat16),
    ("Wan2.1 1.3B, 81 x 480x832", "wan21_sdpo", wan.SCHEDULER, (16, 21, 60, 104), torch.bfloat16),
)


def settings(preset: str, method: str) -> dict:
    """beta, tau, eps_clip, weight_temperature as ``--config=preset --method=method`` resolves them
    (preset over the method's settings over config.Config's defaults)."""
    cfg = importlib.import_module(f"configs.{preset}").CONFIG
    base = {k: getattr(config.Config(), k) for k in ("beta", "tau", "eps_clip", "weight_temperature")}
    return {**base, **config.METHODS[method].settings, **{k: v for k, v in cfg.items() if k in base}}


def t_density(process: noise.Process) -> torch.Tensor:
    """P(t) of the training index, (T,) float64: uniform (DDPM), logit-normal(0, 1) on (t+1)/T's
    grid cell (flows, as ``flow.flow_sample_timesteps``)."""
    T = process.num_timesteps
    if process.kind != "flow":
        return torch.full((T,), 1.0 / T, dtype=torch.float64)
    u = torch.arange(T + 1, dtype=torch.float64) / T
    logit = torch.log(u / (1 - u))  # -inf .. inf
    cdf = 0.5 * (1 + torch.erf(logit / math.sqrt(2)))
    return cdf[1:] - cdf[:-1]


def weighted_median(x: torch.Tensor, p: torch.Tensor) -> float:
    order = torch.argsort(x)
    c = torch.cumsum(p[order], 0)
    return x[order][int(torch.searchsorted(c, c[-1] / 2))].item()


def family_table(scheduler_config: dict, shape: tuple) -> tuple[noise.Process, torch.Tensor, int, torch.Tensor]:
    process = noise.Process.from_config(scheduler_config)
    t = torch.arange(process.num_timesteps)
    return process, process.importance_kappa(t).double(), math.prod(shape), t_density(process)


def calibrated_temperature(preset: str, scheduler_config: dict, shape: tuple, method: str = "sdpo") -> float:
    """temperature with median_t c_t = digits' median_t c_t, c_t = 2 kappa_t D / beta (module docstring)."""
    def median_c(preset_, sc, shp):
        _, kappa, D, p = family_table(sc, shp)
        return weighted_median(2 * kappa * D / settings(preset_, method)["beta"], p)
    name, d_preset, d_sc, d_shape, _ = FAMILIES[0]
    return median_c(d_preset, d_sc, d_shape) / median_c(preset, scheduler_config, shape)


def log_weights(kappa: torch.Tensor, D: int, gap: float, temperature: float, dtype) -> tuple[torch.Tensor, bool]:
    """(T,) log w for a per-value pair gap ``gap`` at every t, through importance.pair_log_weight
    (c_w = c_l = -gap / 4), with the rounding floor of unit-variance predictions in ``dtype``;
    and whether the gap is resolved (False: below the floor, weight 1 at every t)."""
    T = kappa.shape[0]
    c = torch.full((T,), -gap / 4)
    ones = torch.ones(1, 1, dtype=dtype)
    floor = 2 * importance.rounding_floor(ones, ones).item()  # the pair's floor, unit-variance predictions
    lw = importance.pair_log_weight(c, c, kappa.float(), D, floor=floor, temperature=temperature)
    return lw.double(), abs(gap) / 2 > floor


def shares(lw: torch.Tensor, p: torch.Tensor, tau: float, eps_clip: float) -> tuple[float, float]:
    """(masked, clipped) shares of training timesteps (weighted by P(t)): w < tau; kept and
    outside [1 - eps_clip, 1 + eps_clip]."""
    w = lw.exp()
    masked = w < tau
    clipped = ~masked & ((w < 1 - eps_clip) | (w > 1 + eps_clip))
    return p[masked].sum().item(), p[clipped].sum().item()


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, panels = [], []
    for name, preset, sc, shape, dtype in FAMILIES:
        process, kappa, D, p = family_table(sc, shape)
        st = {m: settings(preset, m) for m in ("dpo_cm", "sdpo")}
        temp = st["sdpo"]["weight_temperature"]
        calib = calibrated_temperature(preset, sc, shape)
        kd = (kappa * D)
        row = dict(name=name, preset=preset, D=D, dtype=str(dtype).replace("torch.", ""), process=process,
                   beta=st["sdpo"]["beta"], temp=temp, calib=calib, st=st, kd=(kd.max().item(), kd.min().item()),
                   kd_med=weighted_median(kd, p), cells={})
        curves = []
        for sign in (1, -1):
            for g in GAPS:
                lw, resolved = log_weights(kappa, D, sign * g, temp, dtype)
                curves.append((sign * g, lw, resolved))
                for m in ("dpo_cm", "sdpo"):
                    row["cells"][(m, sign * g)] = (shares(lw, p, st[m]["tau"], st[m]["eps_clip"]), resolved)
        rows.append(row)
        panels.append((name, curves, st, temp))

    fig, axes = plt.subplots(2, 3, figsize=(16, 9), sharey=True)
    for ax, (name, curves, st, temp) in zip(axes.flat, panels):
        for g, lw, resolved in curves:
            w = lw.exp().clamp(*W_RANGE).numpy()
            ax.plot(w, ("-" if g > 0 else "--"), lw=1.2, alpha=1.0 if resolved else 0.35,
                    label=f"g = {g:+.0e}" + ("" if resolved else " (below rounding: w = 1)"))
        for m, colour in (("dpo_cm", "tab:red"), ("sdpo", "tab:purple")):
            ax.axhline(st[m]["tau"], color=colour, lw=0.8, ls=":")
            ax.axhspan(1 - st[m]["eps_clip"], 1 + st[m]["eps_clip"], color=colour, alpha=0.08)
        ax.set_yscale("log")
        ax.set_ylim(*W_RANGE)
        ax.set_title(f"{name} (temperature {temp:g})", fontsize=10)
        ax.set_xlabel("t (0 = data)")
    axes[0, 0].set_ylabel("pair weight w (clipped to the axis)")
    axes[1, 0].set_ylabel("pair weight w (clipped to the axis)")
    axes[0, 0].legend(fontsize=6, loc="lower right")
    fig.suptitle("DPO-C&M / SDPO pair weight over t at each family's real latent size "
                 "(dotted: tau; band: 1 +- eps_clip; red dpo_cm, purple sdpo)", fontsize=11)
    fig.tight_layout()
    out = ROOT / "results"
    fig.savefig(out / "pair_weights.png", dpi=110)
    (out / "pair_weights.md").write_text(markdown(rows))
    print((out / "pair_weights.md").read_text())


def markdown(rows: list[dict]) -> str:
    L = ["# The DPO-C&M / SDPO pair weight per family, at real latent sizes", "",
         f"Written by `{COMMAND}` (do not edit by hand; a few seconds, no model loaded). The weight is",
         "`importance.pair_log_weight` (this project's reading of the SDPO abstract; derivation in",
         "`importance.py`): log E_q[w] = 2 kappa_t D (c_w + c_l), here written log w = -T kappa_t D g",
         "for a per-value pair gap g (policy minus reference error summed over winner and loser, net of",
         "the drift term), T the preset's `weight_temperature`, capped at +-60, and w = 1 where |g| / 2",
         "is within the rounding floor of unit-variance predictions in the training dtype",
         "(`importance.rounding_floor`; bf16: 2.0e-5 per value for the pair). g > 0: the policy fits the",
         "pair worse than the reference (w < 1); g < 0: better (w > 1). See `pair_weights.png`.", "",
         "Calibration: tau / eps_clip were set on digits; each family's temperature makes",
         "c_t = 2 T kappa_t D / beta (the weight per unit of implicit reward, `importance.py` item 3)",
         "equal digits' at the median over its training-t density. 'calibrated' is that value; the",
         "presets hold it rounded.", "",
         "| family | preset | D | dtype | kappa_t D: t = 0 .. max t (median over training t) | beta | T (preset) | T (calibrated) | dpo_cm tau / eps_clip | sdpo tau / eps_clip |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["st"]
        L.append(f"| {r['name']} | `{r['preset']}` | {r['D']:,} | {r['dtype']} | {r['kd'][0]:.3g} .. {r['kd'][1]:.3g} "
                 f"({r['kd_med']:.3g}) | {r['beta']:g} | {r['temp']:.3g} | {r['calib']:.3g} | "
                 f"{s['dpo_cm']['tau']:g} / {s['dpo_cm']['eps_clip']:g} | {s['sdpo']['tau']:g} / {s['sdpo']['eps_clip']:g} |")
    L += ["", "Share of training timesteps (weighted by the family's t density) at which a pair with",
          "per-value gap g is masked (w < tau) / clipped (kept, outside 1 +- eps_clip), with the",
          "sdpo preset's settings; '1' = below the rounding floor (weight 1 at every t):", ""]
    gaps = [s * g for s in (1, -1) for g in GAPS]
    L.append("| family | " + " | ".join(f"g = {g:+.0e}" for g in gaps) + " |")
    L.append("|---|" + "---|" * len(gaps))
    for r in rows:
        cells = []
        for g in gaps:
            (mk, cl), resolved = r["cells"][("sdpo", g)]
            cells.append(f"{100 * mk:.0f}% / {100 * cl:.0f}%" if resolved else "1")
        L.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    L += ["", "Reading: kappa_t D spans many decades over t at the video sizes, so for any fixed gap the",
          "weight is a mask by timestep: masked or clipped at small t (near the data), 1 at large t. The",
          "reading puts low weights at small t, never at the early noisy steps the SDPO abstract names.",
          "In bf16 a gap under the rounding floor is not measurable at all; the weight is then 1.", ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
