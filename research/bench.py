"""Speed and memory of SSPO against its baselines, measured side by side.

    python -m research.bench                      # digits + SD-1.5-shaped UNet -> results/bench.{md,json}
    python -m research.bench --quick              # digits only, few repeats (CI, < 2 minutes on 2 cores)
    python -m research.bench --model sd15 --sd15-full-ft   # also time/measure full fine-tuning of SD-1.5
    python -m research.bench --model sd15 --cuda-check     # on one GPU (< 5 min): the real-size SD-1.5 UNet
                                                  # (64x64, bf16, grad. ckpt, LoRA 4) at the preset's
                                                  # loser settings vs DPO; keeps the other models' rows

What is timed is the real code path: ``loop.training_step`` (encode prompts, per-pair noise,
loser generation via ``sampling.sample``, one reference forward on 2B, one policy forward on
2B, the loss from ``sspo.py``) followed by backward, gradient clipping and an AdamW step, as in
``loop.update`` with ``grad_accum=1``. "SSPO without generation" is the same call with
``sampling.sample`` replaced by a lookup of the batch's given losers, so that it sees the
very inputs Diffusion-DPO sees and differs from it only in the loss (eq. 8-9 vs eq. 5).
All methods of one model run in one process, round-robin (A B C A B C ...) so that drift in the
machine's load hits every method alike; we report the median and the interquartile range.

Peak memory needs a fresh process per method (``--_child``): on CUDA it reports
``torch.cuda.max_memory_allocated``; on CPU the peak resident set (``ru_maxrss``) and the RSS
right after imports, whose difference ("above baseline") is what ratios compare, because the
~0.5 GB of imported libraries is the same for every method. Replay snapshots in such a child are
stored on disk (``pool_storage="disk"``, the SD-1.5 preset's choice): with ``memory`` storage
they would sit in host RAM and count in RSS although, on a GPU, they never count in device
memory; the host RAM they would take is reported as its own column.

The SD-1.5-shaped UNet is the real configuration (859.5M parameters, random weights) with a
small random CLIP text encoder (hidden 768) and no VAE: everything runs in latent space, since
encoding the winners is the same work for every method. On CUDA it runs at the real size (64x64
latents, bf16 autocast, gradient checkpointing). On CPU (2 cores shared with other jobs) it keeps
the real block layout, attention and cross-attention width but divides the block widths by 10
(32, 64, 128, 128) and runs 16x16 latents with one torch thread, and it also times 8x8 latents
("sd15@8"): what matters is the ratio of generation to training, and the two sizes show how much
it moves with size. Full fine-tuning of it is timed only with --sd15-full-ft; its checkpoint swap
is always timed.

"Full SSPO step at the preset's loser settings" is ``loop.update`` itself, end to end: one
timed call is one cycle of ``loser_every`` updates (the first swaps in a checkpoint, always
reloaded: RCR's worst case, and samples the losers with the preset's scheduler, steps and
guidance; the others retrain on those pairs with that same checkpoint as reference), reported
per update, against ``loop.update`` for Diffusion-DPO. Both updates have ``accum`` micro-steps
of the profile's batch: the preset's ``loser_batch`` / ``batch_size`` (its 128 micro-steps are
128 / accum such groups, each with one loser-sampling call, so the ratio per update is the same
but for the once-per-update work: the optimizer step, counted alike for both, is 8x heavier per
micro-step here (pulls the ratio toward 1), and SSPO's reference swap too (pushes it up). The other rows time ``training_step``
directly: ``sspo`` swaps and generates on every update with the profile's steps. Outliers
(Tukey's fences) are listed, not dropped; medians and IQRs are over all repeats.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from research.bench_harness import Harness
from research.bench_report import machine_info, merge_previous, ratio_rows, write_markdown

ROOT = Path(__file__).resolve().parents[1]  # the repository
METHODS = ("sft", "dpo", "sspo_nogen", "sspo")  # optimizer steps; "sspo" includes generation + swap
# The SD-1.5 UNet's block widths divided by 10 (same blocks, layers, attention, cross-attention 768):
# what 2 shared CPU cores can time with enough repeats; the real width runs on CUDA.
SD15_CPU_WIDTH = (32, 64, 128, 128)


def preset_losers(model: str) -> dict:
    """Loser sampling of the model's preset (configs/digits.py, configs/sd15_pickapic.py)."""
    import config
    c = dataclasses.replace(config.Config(), **{k: v for k, v in config.load_preset(
        "digits" if model == "digits" else "sd15_pickapic").items()})
    # accum: micro-steps per timed update. The preset's 128 (batch 1) are timed as one group of
    # loser_batch / batch_size micro-steps, whose losers are sampled in one call: the 128 micro-steps
    # of a real update are 128 / accum such groups, so the per-update ratio is the same.
    accum = max(1, c.loser_batch // c.batch_size) if c.loser_batch else 1
    return {"scheduler": c.loser_scheduler, "steps": c.loser_steps, "guidance": c.loser_guidance,
            "every": c.loser_every, "batch": c.loser_batch, "accum": min(accum, c.grad_accum)}


def profile(model: str, cuda: bool, quick: bool, cuda_check: bool = False) -> dict:
    """Benchmark settings per model. Knobs follow configs/digits.py and configs/sd15_pickapic.py
    (beta, guidance, loser sampling, pool storage); sizes and repeats are cut where 2 CPU cores
    demand it. "sd15@8" is the CPU's second latent size (timings only)."""
    loser = preset_losers(model)
    if model == "digits":
        p = dict(latent=8, channels=1, batch=32, loser_steps=10, preset_loser_steps=10,
                 guidance=3.0, beta=500.0, lora_rank=4, storage="memory", grad_ckpt=False,
                 bf16=False, full_ft=True, warmup=1, repeats=6, child_steps=3)
        p.update(loser=loser, scheduler="ddim", memory=True, threads=0, width=None)
        if quick:  # a small batch, two repeats: CI needs every row of the table, not tight error bars
            p.update(batch=4, warmup=1, repeats=2, child_steps=2)
        return p
    # CPU: reduced width (SD15_CPU_WIDTH) and latents, one torch thread (two threads on two
    # shared cores spin-wait on each other: 50x slower), the preset's loser sampling end to end.
    p = dict(latent=16, channels=4, batch=1, loser_steps=loser["steps"], preset_loser_steps=loser["steps"],
             guidance=loser["guidance"], beta=5000.0, lora_rank=8, storage="disk", grad_ckpt=False,
             bf16=False, full_ft=False, warmup=1, repeats=5, child_steps=1, loser=loser,
             scheduler=loser["scheduler"], memory=True, threads=1, width=SD15_CPU_WIDTH)
    if model == "sd15@8":  # the second size: does generation / training change with the latent size?
        p.update(latent=8, memory=False)
    if cuda:  # the real size and the preset's precision / checkpointing / sampling
        p.update(latent=64, width=None, threads=0, grad_ckpt=True, bf16=True, full_ft=True,
                 warmup=2, repeats=10, child_steps=2, levers=True)
    if cuda_check:  # one GPU, < 5 minutes: LoRA rank 4, batch 1, no full fine-tuning
        p.update(lora_rank=4, full_ft=False, repeats=12 if cuda else 3, warmup=2 if cuda else 1,
                 latent=64 if cuda else 8)
    if quick:
        p.update(latent=8, repeats=2)
    return p


# ----------------------------------------------------------------------------- statistics, timing

def summarize(samples_ms: list[float]) -> dict:
    """Median and interquartile range (numpy's linear-interpolation quartiles); outliers are
    the samples outside Tukey's fences [q1 - 1.5 IQR, q3 + 1.5 IQR] (reported, not dropped)."""
    x = np.asarray(samples_ms, dtype=float)
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    iqr = q3 - q1
    out = [float(v) for v in x if v < q1 - 1.5 * iqr or v > q3 + 1.5 * iqr]
    return {"median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3),
            "iqr_ms": float(iqr), "n": len(samples_ms), "outliers_ms": out}


def measure(fns: dict, warmup: int, repeats: int, sync=lambda: None, log=print) -> dict:
    """Time each zero-argument callable ``repeats`` times after ``warmup`` untimed calls,
    round-robin over the callables. ``sync`` waits for queued device work (CUDA is async).
    Returns {name: [ms, ...]}."""
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        line = []
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ms = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                times[name].append(ms)
            line.append(f"{name} {ms:.1f}")
        tag = "warm-up" if r < warmup else f"repeat {r - warmup + 1}/{repeats}"
        log(f"  {tag}: " + ", ".join(line) + " ms")
    return times


# ----------------------------------------------------------------------------- peak memory (child)

def rss_mb() -> float:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def peak_rss_mb() -> float:
    """Peak RSS of this process. Linux: VmHWM of /proc/self/status, which starts afresh at exec;
    ru_maxrss would not, since Linux carries it over from the forked parent (a large pytest
    process would then hide the child's own peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB -> MB
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 2**20 if sys.platform == "darwin" else ru / 1024  # bytes on macOS, KiB on Linux


def child_main(spec: dict) -> dict:
    """Run in a fresh process: build one method's setup, run a few updates, report the peak."""
    device = torch.device(spec["device"])
    if spec["kind"] != "alloc":  # libraries count in the baseline, not in a method's memory
        import config, loop, models, replay, sspo  # noqa: F401
        from models import sampling  # noqa: F401
    baseline = rss_mb()
    if spec["kind"] == "alloc":  # for the tests: the report must see a large allocation
        x = torch.ones(int(spec["mb"] * 2**20 // 4))
        del x
    else:
        method, p = spec["method"], spec["p"]
        with tempfile.TemporaryDirectory() as tmp:
            if p.get("threads"):
                torch.set_num_threads(p["threads"])
            h = Harness(spec["model"], spec["mode"] == "lora", dict(p, storage="disk"), device,
                        reference=method != "sft", storages=() if method == "sft" else ("disk",),
                        pool_dir=tmp)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for i in range(p["child_steps"]):
                h.step(method, i)
                if i == 0 and method == "sspo":  # a second checkpoint so that replay swaps
                    h.pools["disk"].add(h.bundle.trainable_state_dict(), 1)
    out = {"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "device": "cpu-rss"}
    if device.type == "cuda":
        out.update(baseline_mb=0.0, peak_mb=torch.cuda.max_memory_allocated(device) / 2**20,
                   device="cuda-max-allocated")
    out["above_baseline_mb"] = out["peak_mb"] - out["baseline_mb"]
    return out


def run_child(spec: dict) -> dict:
    """``python -m research.bench --_child=<json>`` in a fresh interpreter; its last stdout line is JSON."""
    r = subprocess.run([sys.executable, "-m", "research.bench", "--_child", json.dumps(spec)],
                       capture_output=True, text=True, cwd=str(ROOT))
    if r.returncode != 0:
        raise RuntimeError(f"memory child {spec.get('method', spec['kind'])} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- one model, all methods

def bench_model(model: str, p: dict, device: torch.device, log=print) -> tuple[list, list, dict]:
    """Peak memory (fresh child per method), then timings in this process. Returns
    (timing rows, memory rows, extra facts such as snapshot sizes)."""
    threads = torch.get_num_threads()
    if p.get("threads"):
        torch.set_num_threads(p["threads"])
    try:
        return _bench_model(model, p, device, log)
    finally:
        torch.set_num_threads(threads)


def _bench_model(model: str, p: dict, device: torch.device, log=print) -> tuple[list, list, dict]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    modes = ("ft", "lora") if p["full_ft"] else ("lora",)
    timings, memory, extra = [], [], {}
    # Memory first, while this process holds no model (an SD-1.5 child alone needs GBs of RAM).
    for mode in modes if p.get("memory", True) else ():
        for method in ("sft", "dpo", "sspo"):
            r = run_child({"kind": "method", "model": model, "mode": mode, "method": method,
                           "p": p, "device": str(device)})
            memory.append(dict(model=model, mode=mode, method=method, **r))
            log(f"[{model}/{mode}] memory {method}: peak {r['peak_mb']:.0f} MB "
                f"({r['above_baseline_mb']:.0f} above baseline)")
    other = "disk" if p["storage"] != "disk" else "memory_bf16"
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ft", "lora"):  # full-FT swaps are timed even where full-FT steps are not
            h = Harness(model, mode == "lora", p, device, storages=(p["storage"], other),
                        pool_dir=os.path.join(tmp, mode))
            extra[f"snapshot_mb_{mode}"] = {"memory": h.snapshot_mb(4), "memory_bf16": h.snapshot_mb(2)}
            extra["attention"] = sorted({type(a).__name__ for a in h.bundle.unet.attn_processors.values()})
            fns = {}
            loser, count = p["loser"], iter(range(10**9))
            if mode in modes:
                fns = {m: (lambda m=m: h.step(m)) for m in METHODS}
                # loop.update itself: a DPO update, and one cycle of loser_every SSPO updates
                # at the preset's loser settings (timed per cycle, reported per update).
                fns["dpo_update"] = lambda: h.cycle("dpo", loser, next(count))
                fns["sspo_preset"] = lambda: h.cycle("sspo", loser, next(count))
                fns["gen_cfg"] = lambda: h.generate(p["guidance"])
                fns["gen_nocfg"] = lambda: h.generate(1.0)  # guidance 1 = conditional pass only
                fns["gen_preset"] = lambda: h.generate(loser["guidance"], loser["steps"], loser["scheduler"])
                if p.get("levers"):  # CUDA: the same generation without bf16 autocast
                    fns["gen_preset_fp32"] = lambda: h.generate(loser["guidance"], loser["steps"],
                                                                loser["scheduler"], autocast=False)
            for s in (p["storage"], other):
                fns[f"swap_{s}"] = lambda s=s: h.swap(s)
            log(f"[{model}/{mode}] timing {', '.join(fns)}")
            measured = measure(fns, p["warmup"], p["repeats"], sync, log)
            if "sspo_preset" in measured:  # one cycle = loser_every updates
                measured["sspo_preset"] = [ms / loser["every"] for ms in measured["sspo_preset"]]
            if mode in modes and p.get("levers"):  # channels-last: the UNet converted in place
                h.bundle.unet.to(memory_format=torch.channels_last)
                measured.update(measure({"gen_preset_channels_last": fns["gen_preset"]}, p["warmup"],
                                        p["repeats"], sync, log))
                h.bundle.unet.to(memory_format=torch.contiguous_format)
            for name, ms in measured.items():
                row = dict(model=model, mode=mode, measure=name, **summarize(ms))
                timings.append(row)
                log(f"[{model}/{mode}] {name}: median {row['median_ms']:.1f} ms, IQR {row['iqr_ms']:.1f}")
            del h, fns
            gc.collect()
    return timings, memory, extra


NOTES = [" ".join(par.split()) for par in __doc__.split("\n\n")[2:]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Speed and memory of SSPO vs SFT and Diffusion-DPO.")
    ap.add_argument("--quick", action="store_true", help="digits only, few repeats (CI)")
    ap.add_argument("--model", default="all", choices=("digits", "sd15", "all"),
                    help="which model(s); sd15 on CPU also times a second latent size (sd15@8)")
    ap.add_argument("--cuda-check", action="store_true",
                    help="sd15 only: on CUDA the real-size UNet, 64x64, bf16, LoRA 4 (< 5 min on one "
                         "H100); on CPU the same at reduced size. Rows of other models are kept")
    ap.add_argument("--out", default="results", help="directory for bench.md and bench.json")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    ap.add_argument("--sd15-full-ft", action="store_true", help="also full fine-tuning of SD-1.5 on CPU")
    ap.add_argument("--repeats", type=int, help="override timed repeats per measurement")
    ap.add_argument("--warmup", type=int, help="override untimed warm-up calls")
    ap.add_argument("--_child", help=argparse.SUPPRESS)  # internal: one memory measurement
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(child_main(json.loads(args._child))))
        return 0
    t0 = time.perf_counter()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.cuda_check:
        args.model = "sd15"
    models_ = ["digits"] if args.quick and args.model == "all" else \
        (["digits", "sd15"] if args.model == "all" else [args.model])
    if "sd15" in models_ and device.type == "cpu" and not args.cuda_check:
        models_.append("sd15@8")
    profiles = {m: profile(m, device.type == "cuda", args.quick, args.cuda_check) for m in models_}
    for p in profiles.values():
        p.update({k: v for k, v in (("repeats", args.repeats), ("warmup", args.warmup)) if v is not None})
    if "sd15" in profiles and args.sd15_full_ft:
        profiles["sd15"]["full_ft"] = True
    res = {"command": "python -m research.bench " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine_info(device), "profiles": profiles, "timings": [], "memory": [],
           "extra": {}, "notes": NOTES,
           "memory_note": "CUDA max_memory_allocated" if device.type == "cuda" else "CPU peak RSS"}
    print(f"bench: {models_} on {device}", flush=True)
    for m in models_:
        timings, memory, extra = bench_model(m, profiles[m], device, log=lambda s: print(s, flush=True))
        res["timings"] += timings
        res["memory"] += memory
        res["extra"][m] = extra
    res["ratios"] = ratio_rows(res["timings"], res["memory"], profiles)
    res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["runtime_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    merge_previous(res, out / "bench.json")
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    write_markdown(res, out / "bench.md")
    for r in res["ratios"]:
        print(f"{r['model']}/{r['mode']} {r['ratio']}: {r['value']:.3f}"
              + ("" if r["target"] is None else f" (target <= {r['target']}: {'met' if r['met'] else 'MISSED'})"))
    print(f"wrote {out / 'bench.md'} and {out / 'bench.json'} in {res['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
