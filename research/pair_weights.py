"""Where the DPO-C&M / SDPO importance weights act: the pair weight over t, and the shares of
pairs that the default ``tau`` masks and the default ``eps_clip`` clips.

    python -m research.pair_weights      # ~1.5 min of CPU on one thread (+1-2 min if the base is missing)

Writes ``results/pair_weights.png`` (weight vs t, with tau and the clip bands) and
``results/pair_weights.md`` (the shares, computed here). The weight is importance.pair_log_weight's
(this project's reading of [SDPO], derived in importance.py's module docstring). A policy's weights
against its own reference are all exactly 1, so each model is measured after short
Diffusion-DPO fine-tunes away from its reference (two lengths), the situation DPO-C&M and SDPO
meet during training:

(a) digits: reference = the cached digits base (cache/, built by train.py if missing: the
    full 1,500-update base when it is there, else a 300-update one, 1-2 minutes); policy =
    reference + Diffusion-DPO updates on the align split with the digits preset's beta and
    learning rate. D = 1x8x8 = 64 values per sample.
(b) SD-1.5 shape: SD-1.5's latent shape, 4x64x64 = 16,384 values per sample, SD-1.5's schedule
    and beta = 5000, and a learning rate of SD-1.5's Diffusion-DPO order (1e-5), but a
    *reduced-width* random-init UNet2DConditionModel (SD-1.5's own is far too slow on this CPU),
    pretrained with 150 SFT updates (~40 s) on 4x64x64 stand-in latents (digits upsampled to
    64x64, four fixed channel mixes). Its errors are not SD-1.5's; what it shares with SD-1.5 is D, the
    schedule and beta, which set the weights' scale.
The shares grow with how far the policy has drifted; read them as an order of magnitude.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

import config
import data
import models
from infra import runtime
import importance
import sspo
import train

ROOT = Path(__file__).resolve().parents[1]  # the repository
SEED = 0
DIGITS_DPO_UPDATES = (25, 50)  # measured after each; the digits preset runs 300 updates
SD_PRETRAIN_UPDATES, SD_PRETRAIN_LR = 150, 2e-3
SD_DPO_UPDATES = (15, 30)
SD_BETA, SD_LR = 5000.0, 1e-5  # configs/sd15_pickapic.py: beta 5000, lr ~1e-5
SD_EVAL_BATCHES = 16
W_FLOOR = 1e-3               # the plot's lowest weight
T_PER_PAIR = 2               # evaluation: timesteps drawn per pair (stratified over [0, T))


# --------------------------------------------------------------------------------- models

def digits_models(log) -> tuple:
    """(bundle, reference UNet, Config of the digits preset with method dpo); the cached
    digits base is the reference and, in the bundle, the policy's starting point."""
    cfg = config.resolve({"method": "dpo"})
    full = Path(cfg.cache_dir) / f"digits_base_steps{cfg.digits_base_steps}_corrupt{cfg.digits_corrupt:g}_v1"
    if not (full / "model_index.json").exists():
        cfg.digits_base_steps = 300  # 1-2 minutes on one thread; cached for the next run
    t0 = time.perf_counter()
    path = train.ensure_digits_base(cfg, runtime.setup_distributed())
    log(f"digits reference: {path.name} ({time.perf_counter() - t0:.0f} s)")
    bundle = models.build_model("digits", str(path))
    return bundle, copy.deepcopy(bundle.unet).requires_grad_(False).eval(), cfg


def sd_shape_unet() -> UNet2DConditionModel:
    """A reduced-width UNet2DConditionModel at SD-1.5's latent shape (4x64x64): four levels
    (64 -> 32 -> 16 -> 8), cross-attention at 8x8 only, 0.36M parameters (SD-1.5: 860M)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(8, 16, 32, 32), norm_num_groups=8, attention_head_dim=4,
            down_block_types=("DownBlock2D",) * 3 + ("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * 3, cross_attention_dim=64)


def to_sd_latents(x: torch.Tensor) -> torch.Tensor:
    """Stand-in latents: digits (B,1,8,8) -> (B,4,64,64), bilinear, four fixed channel mixes,
    overall scale ~1 like SD-1.5's scaled VAE latents."""
    up = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)  # (B,1,64,64)
    gain = torch.tensor([1.0, -0.8, 0.6, 0.4]).view(1, 4, 1, 1)
    bias = torch.tensor([0.0, 0.2, -0.3, 0.1]).view(1, 4, 1, 1)
    return up * gain + bias  # (B,4,64,64)


# --------------------------------------------------------------------------------- training

def errors(unet, x0, t, eps, text, schedule, grad=False) -> torch.Tensor:
    """Per-sample mean squared eps errors (B,) of ``unet`` at x_t = q(x_t | x0)."""
    abar = schedule["alphas_cumprod"]
    x_t = sspo.q_sample(x0, t, eps, abar)
    with torch.set_grad_enabled(grad):
        pred = unet(x_t, t, encoder_hidden_states=text).sample
    return sspo.per_sample_error(pred, sspo.training_target(x0, eps, t, abar))


def finetune(unet, reference, batches, steps, lr, schedule, beta=None, gen=None) -> None:
    """``steps`` AdamW updates: SFT on x0_w when ``beta`` is None, else Diffusion-DPO."""
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=lr)
    unet.train()
    for _ in range(steps):
        x0_w, x0_l, text = next(batches)
        B = x0_w.shape[0]
        t = torch.randint(0, len(schedule["betas"]), (B,), generator=gen)
        eps = torch.randn(x0_w.shape, generator=gen)
        if beta is None:
            loss = errors(unet, x0_w, t, eps, text, schedule, grad=True).mean()
        else:
            x0, t2 = torch.cat([x0_w, x0_l]), torch.cat([t, t])  # (2B,...), pair shares t, eps
            eps2, text2 = torch.cat([eps, eps]), torch.cat([text, text])
            m_w, m_l = errors(unet, x0, t2, eps2, text2, schedule, grad=True).chunk(2)
            r_w, r_l = errors(reference, x0, t2, eps2, text2, schedule).chunk(2)
            loss = sspo.dpo_loss(m_w, m_l, r_w, r_l, beta=beta)[0].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
    unet.eval()


def pair_batches(ds, bundle, batch_size, gen, to_x0=lambda x: x):
    """Endless (x0_w, x0_l, text) batches of a digits pairs dataset, shuffled by ``gen``."""
    with torch.no_grad():
        items = [ds[i] for i in range(len(ds))]
        x_w = to_x0(torch.stack([it["x0_w"] for it in items]))
        x_l = to_x0(torch.stack([it["x0_l"] for it in items]))
        text = models.encode_prompts(bundle, [it["prompt"] for it in items])  # (N,77,64)
    while True:
        for idx in torch.randperm(len(items), generator=gen).split(batch_size):
            if len(idx) == batch_size:
                yield x_w[idx], x_l[idx], text[idx]


# --------------------------------------------------------------------------------- measuring

def measure(policy, reference, batches, n_batches, schedule, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair log weights and their t over ``n_batches`` batches, T_PER_PAIR stratified t each.
    Returns (t (N,), log_w (N,))."""
    T = len(schedule["betas"])
    ts, logws = [], []
    for _ in range(n_batches):
        x0_w, x0_l, text = next(batches)
        B, D = x0_w.shape[0], x0_w[0].numel()
        for _ in range(T_PER_PAIR):
            # stratified over [0, T): pair i gets a t in the i-th of B equal slices
            t = ((torch.arange(B) + torch.rand(B, generator=gen)) * T / B).long().clamp(max=T - 1)
            t = t[torch.randperm(B, generator=gen)]
            eps = torch.randn(x0_w.shape, generator=gen)
            x0, t2 = torch.cat([x0_w, x0_l]), torch.cat([t, t])
            eps2, text2 = torch.cat([eps, eps]), torch.cat([text, text])
            m_w, m_l = errors(policy, x0, t2, eps2, text2, schedule).chunk(2)
            r_w, r_l = errors(reference, x0, t2, eps2, text2, schedule).chunk(2)
            ts.append(t)
            logws.append(importance.pair_log_weight(m_w, m_l, r_w, r_l, t, schedule, num_values=D))
    return torch.cat(ts), torch.cat(logws)


def shares(log_w: torch.Tensor, tau: float, eps_clip: float) -> dict:
    """Fraction masked (w < tau), fraction of kept pairs clipped, as sspo's losses count them."""
    zeros = torch.zeros_like(log_w)
    _, met = importance.dpo_cm_loss(zeros, zeros, zeros, zeros, log_w, tau=tau, eps_clip=eps_clip)
    return {"masked": met["mask_rate"].item(), "clipped": met["clip_rate"].item()}


# --------------------------------------------------------------------------------- outputs

def presets() -> tuple[dict, dict]:
    """{"tau", "eps_clip"} of the dpo_cm and the sdpo method, as config.py resolves them."""
    out = []
    for method in ("dpo_cm", "sdpo"):
        cfg = config.resolve({"method": method})
        out.append({"tau": cfg.tau, "eps_clip": cfg.eps_clip})
    return out[0], out[1]


def plot(panels: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path) -> None:
    """One column per model: the pair weight vs t (log axis: lambda_t ~ 1/(2t) puts the action
    at small t), all pairs on a log weight axis (top) and a linear zoom around 1 (bottom),
    with quantile bands per t bin, both methods' tau and clip bands."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm, sd = presets()
    edges = torch.tensor([0, 10, 30, 100, 300, 1000])
    fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 7.5), sharex=True, squeeze=False)
    for col, (title, t, log_w) in enumerate(panels):
        w = log_w.exp()
        mid = (edges[1:] * edges[:-1].clamp(min=1)).float().sqrt()  # geometric bin centres
        probs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
        q = torch.stack([torch.quantile(w[b], probs) if b.sum() > 1 else torch.full((5,), float("nan"))
                         for b in ((t >= lo) & (t < hi) for lo, hi in zip(edges[:-1], edges[1:]))])
        for row, ax in enumerate(axes[:, col]):
            ax.scatter(t + 1, w.clamp(min=W_FLOOR), s=4, alpha=0.4, color="tab:gray", zorder=3, label="pairs")
            ax.fill_between(mid, q[:, 0], q[:, 4], color="tab:blue", alpha=0.15, label="5-95% per t bin")
            ax.fill_between(mid, q[:, 1], q[:, 3], color="tab:blue", alpha=0.3, label="25-75%")
            ax.plot(mid, q[:, 2], color="tab:blue", label="median")
            ax.axhspan(1 - cm["eps_clip"], 1 + cm["eps_clip"], color="tab:green", alpha=0.15,
                       label=f"dpo_cm clip band 1 +- {cm['eps_clip']:g}")
            ax.axhline(cm["tau"], color="tab:red", ls="--", label=f"dpo_cm tau = {cm['tau']:g}")
            ax.axhline(sd["tau"], color="tab:purple", ls=":", label=f"sdpo tau = {sd['tau']:g}")
            for sign in (1, -1):
                ax.axhline(1 + sign * sd["eps_clip"], color="tab:purple", ls="-.", lw=0.8,
                           label=f"sdpo clip band 1 +- {sd['eps_clip']:g}" if sign > 0 else None)
            ax.set_xscale("log")
            if row == 0:
                ax.set_yscale("log")
                ax.set_ylim(W_FLOOR / 1.5, 3)
                ax.set_title(title, fontsize=10)
                ax.set_ylabel(f"pair weight w_w * w_l\n(below {W_FLOOR:g}: drawn at {W_FLOOR:g})")
            else:
                ax.set_ylim(0.6, 1.15)
                ax.set_ylabel("pair weight (zoom)")
                ax.set_xlabel("training timestep t + 1 (1 = clean end, 1000 = noise end)")
    axes[1, -1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], seconds: float) -> str:
    cm, sd = presets()
    out = [
        "# Pair importance weights of DPO-C&M and SDPO over t",
        "",
        "Written by `python -m research.pair_weights` (do not edit by hand). The weight is",
        "`importance.pair_log_weight` (this project's reading of [SDPO]; derivation in `importance.py`'s module",
        "docstring): log w = -lambda_t * D * ((m_w - r_w) + (m_l - r_l)), policy errors m against",
        "the reference's r. Each policy is its reference after a short Diffusion-DPO fine-tune",
        "(weights of a policy against itself are all 1). See `pair_weights.png`.",
        "",
        f"Defaults (config.py, as `--method=dpo_cm` / `--method=sdpo` resolve them): dpo_cm tau = {cm['tau']:g}, eps_clip = {cm['eps_clip']:g};"
        f" sdpo tau = {sd['tau']:g}, eps_clip = {sd['eps_clip']:g}.",
        "masked = share of pairs with w < tau; clipped = share of the kept pairs whose weight lies",
        "outside [1 - eps_clip, 1 + eps_clip] (the `clip_rate` metric).",
        "",
        "| model | D | policy = reference ... | pairs | dpo_cm masked | dpo_cm clipped | sdpo masked"
        " | sdpo clipped | w < 1 | median w, t < 100 | median w, t >= 500 | 1%-99% of w |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, t = r["log_w"].exp(), r["t"]
        a, b = shares(r["log_w"], cm["tau"], cm["eps_clip"]), shares(r["log_w"], sd["tau"], sd["eps_clip"])
        lo, hi = torch.quantile(w, torch.tensor([0.01, 0.99])).tolist()
        out.append(
            f"| {r['name']} | {r['D']:,} | {r['how']} | {len(w)} | {a['masked']:.1%} | {a['clipped']:.1%}"
            f" | {b['masked']:.1%} | {b['clipped']:.1%} | {(w < 1).float().mean():.1%}"
            f" | {w[t < 100].median():.3f} | {w[t >= 500].median():.3f} | {lo:.3f} - {hi:.3f} |")
    out += ["", "Share of pairs that dpo_cm masks or clips, by t (w < tau or outside the clip band):", "",
            "| model | " + " | ".join(f"t {lo}-{lo + 99}" for lo in range(0, 1000, 100)) + " |",
            "|---|" + "---|" * 10]
    for r in rows:
        w, t = r["log_w"].exp(), r["t"]
        acts = (w < cm["tau"]) | (w < 1 - cm["eps_clip"]) | (w > 1 + cm["eps_clip"])
        out.append(f"| {r['name']}, {r['how'].split(' + ')[1].split(' (')[0]} | " + " | ".join(
            f"{acts[(t >= lo) & (t < lo + 100)].float().mean():.0%}" for lo in range(0, 1000, 100)) + " |")
    out += ["", f"Runtime {seconds:.0f} s wall, {time.process_time():.0f} s CPU, on "
            f"{torch.get_num_threads()} CPU thread(s) (wall > CPU: a busy, shared machine); seed {SEED}.", ""]
    return "\n".join(out)


def drift_and_measure(name, D, policy, reference, train_batches, eval_batches, n_eval, levels,
                      lr, beta, schedule, gen, log, how) -> list[dict]:
    """Diffusion-DPO updates up to each count in ``levels``, measuring the weights after each."""
    rows, done = [], 0
    for n in levels:
        finetune(policy, reference, train_batches, n - done, lr, schedule, beta=beta, gen=gen)
        done = n
        t, log_w = measure(policy, reference, eval_batches, n_eval, schedule, gen)
        rows.append(dict(name=name, D=D, t=t, log_w=log_w,
                         how=f"{how} + {n} DPO updates (beta {beta:g}, lr {lr:g})"))
        log(f"{name}: measured after {n} Diffusion-DPO updates")
    return rows


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:5.0f} s] {msg}", flush=True)
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)

    # (a) the digits model: the cached base, then Diffusion-DPO with the digits preset
    bundle, reference, cfg = digits_models(log)
    sc = bundle.scheduler_config
    schedule = sspo.make_schedule(sc["num_train_timesteps"], sc["beta_start"], sc["beta_end"], sc["beta_schedule"])
    ds = data.DigitsDataset("align", mode="pairs", seed=SEED)
    rows = drift_and_measure("digits", 64, bundle.unet, reference, pair_batches(ds, bundle, cfg.batch_size, gen),
                             pair_batches(ds, bundle, 64, gen), len(ds) // 64, DIGITS_DPO_UPDATES, cfg.lr,
                             cfg.beta, schedule, gen, log, "cached base")

    # (b) SD-1.5's latent shape with a reduced-width UNet (prompts: the digits base's encoder)
    unet = sd_shape_unet()
    sd_batches = pair_batches(ds, bundle, 8, gen, to_x0=to_sd_latents)
    finetune(unet, None, sd_batches, SD_PRETRAIN_UPDATES, SD_PRETRAIN_LR, schedule, gen=gen)
    log(f"SD-1.5 shape: reference pretrained, {SD_PRETRAIN_UPDATES} SFT updates")
    sd_ref = copy.deepcopy(unet).requires_grad_(False).eval()
    rows += drift_and_measure("SD-1.5 shape", 4 * 64 * 64, unet, sd_ref,
                              pair_batches(ds, bundle, 4, gen, to_x0=to_sd_latents), sd_batches,
                              SD_EVAL_BATCHES, SD_DPO_UPDATES, SD_LR, SD_BETA, schedule, gen, log,
                              f"{SD_PRETRAIN_UPDATES} SFT updates")

    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    last = [r for i, r in enumerate(rows) if i + 1 == len(rows) or rows[i + 1]["name"] != r["name"]]
    plot([(f"{r['name']}, D = {r['D']:,} values per sample\n{r['how']}", r["t"], r["log_w"]) for r in last],
         out / "pair_weights.png")
    md = markdown(rows, time.perf_counter() - start)
    (out / "pair_weights.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
