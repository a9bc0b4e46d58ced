"""research/bench.py's report: the ratios against the issue's targets, the machine, the markdown table of
timings, memory and the ratio rows, and the rows of models a run did not measure, kept from the
previous bench.json."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
from pathlib import Path

import torch


def ratio_rows(timings: list, memory: list, profiles: dict) -> list:
    """The ratios of the issue, each with its target (or None: reported only)."""
    T = {(r["model"], r["mode"], r["measure"]): r["median_ms"] for r in timings}
    M = {(r["model"], r["mode"], r["method"]): r["above_baseline_mb"] for r in memory}
    rows = []

    def add(model, mode, name, num, den, target=None, note=""):
        if num is None or den is None or den <= 0:
            return
        v = num / den
        met = None if target is None else v <= target
        rows.append(dict(model=model, mode=mode, ratio=name, value=v, target=target, met=met,
                         over_pp=None if met in (None, True) else 100 * (v - target), note=note))

    for model, p in profiles.items():
        for mode in ("ft", "lora"):
            t = lambda k: T.get((model, mode, k))
            swap = t(f"swap_{p['storage']}")
            add(model, mode, "SSPO step w/o generation / DPO step", t("sspo_nogen"), t("dpo"), 1.05)
            add(model, mode, "full SSPO step / DPO step at the preset's loser settings", t("sspo_preset"),
                t("dpo_update"), 1.8 if model == "sd15" else None)
            add(model, mode, "loser generation at the preset's settings, one micro-batch / DPO step",
                t("gen_preset"), t("dpo"))
            add(model, mode, "generation at the preset's settings, bf16 / fp32", t("gen_preset"),
                t("gen_preset_fp32"))
            add(model, mode, "generation at the preset's settings, channels-last / default",
                t("gen_preset_channels_last"), t("gen_preset"))
            add(model, mode, "full SSPO step / DPO step", t("sspo"), t("dpo"))
            add(model, mode, f"swap ({p['storage']}) / full SSPO step", swap, t("sspo"),
                0.02 if mode == "lora" else None)
            add(model, mode, f"swap ({p['storage']}) / SSPO step w/o generation", swap, t("sspo_nogen"))
            add(model, mode, f"generation ({p['loser_steps']} {p.get('scheduler', 'ddim')} steps, CFG) / full SSPO step",
                t("gen_cfg"), t("sspo"))
            add(model, mode, "generation without CFG / with CFG", t("gen_nocfg"), t("gen_cfg"))
            if t("gen_cfg") and t("sspo_nogen"):
                # Derived, not measured: generation is linear in DDIM steps (one UNet call each).
                per_call = t("gen_cfg") / p["loser_steps"]
                rest = t("sspo_nogen") + (swap or 0)
                n = p["preset_loser_steps"]
                add(model, mode, f"generation share at the preset's {n} steps (derived)",
                    per_call * n, per_call * n + rest, note=f"{per_call:.1f} ms per CFG step")
                every = (p.get("loser") or {}).get("every") or 1
                k = every if every > 1 else 4  # the preset's reuse interval, or 4 for a preset without reuse
                add(model, mode, f"generation share if regenerated every {k} updates, one micro-batch per call (derived)",
                    per_call * n / k, per_call * n / k + rest)
            m = lambda meth: M.get((model, mode, meth))
            if mode == "ft":
                add(model, mode, "SSPO memory / DPO memory", m("sspo"), m("dpo"), 1.05)
            else:
                add(model, mode, "SSPO memory / SFT memory", m("sspo"), m("sft"), 1.10)
                add(model, mode, "SSPO memory / DPO memory", m("sspo"), m("dpo"))
    return rows


def machine_info(device: torch.device) -> dict:
    import diffusers, peft, transformers
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "device": str(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


MEASURE_TEXT = {"sft": "SFT step", "dpo": "Diffusion-DPO step", "sspo_nogen": "SSPO step, losers given",
                "sspo": "SSPO step, full (swap + generation)", "gen_cfg": "loser generation, CFG",
                "gen_nocfg": "loser generation, no CFG",
                "dpo_update": "Diffusion-DPO update (loop.update)",
                "sspo_preset": "SSPO update at the preset's loser settings (loop.update, per update of a cycle)",
                "gen_preset": "loser generation at the preset's settings",
                "gen_preset_fp32": "loser generation at the preset's settings, fp32",
                "gen_preset_channels_last": "loser generation at the preset's settings, channels-last"}


def write_markdown(res: dict, path: Path) -> None:
    m = res["machine"]
    L = ["# SSPO benchmark", "",
         f"`{res['command']}` on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, "
         f"{m['ram_gb']} GB RAM{', GPU ' + m['gpu'] if 'gpu' in m else ''}), device `{m['device']}`, "
         f"torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}, "
         f"peft {m['peft']}, Python {m['python']}; {m['date']}; load average at start "
         f"{m['loadavg_start']}, at end {m.get('loadavg_end')}; {res['runtime_s']:.0f} s in all.", "",
         "## Settings", "",
         "| model | UNet widths | latent | batch (pairs) | loser steps (preset) | guidance | "
         "preset's losers: scheduler, steps, guidance, every, pairs per call, micro-steps per timed update | beta | LoRA rank | "
         "grad. ckpt | bf16 | pool storage | warm-up + repeats |", "|" + "---|" * 13]
    for model, p in res["profiles"].items():
        lo = p.get("loser") or {}
        width = "x".join(map(str, p["width"])) if p.get("width") else "real"
        L.append(f"| {model} | {width} | {p['channels']}x{p['latent']}x{p['latent']} | {p['batch']} | "
                 f"{p['loser_steps']} ({p['preset_loser_steps']}) | {p['guidance']} | "
                 + (f"{lo['scheduler']}, {lo['steps']}, {lo['guidance']}, {lo['every']}, "
                    f"{lo.get('batch', 0) or p['batch']}, {lo.get('accum', 1)} | " if lo.get("scheduler") else "- | ")
                 + f"{p['beta']:g} | {p['lora_rank']} | {p['grad_ckpt']} | {p['bf16']} | {p['storage']} | "
                 f"{p['warmup']} + {p['repeats']} |")
    L += ["", "## Time per call (ms)", "",
          "| model | mode | measurement | median | IQR | q1 - q3 | n | outliers (Tukey) |", "|" + "---|" * 8]
    for r in res["timings"]:
        what = MEASURE_TEXT.get(r["measure"], r["measure"].replace("swap_", "checkpoint swap, pool "))
        outl = ", ".join(f"{v:.0f}" for v in r.get("outliers_ms", [])) or "-"
        L.append(f"| {r['model']} | {r['mode']} | {what} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | "
                 f"{r['q1_ms']:.1f} - {r['q3_ms']:.1f} | {r['n']} | {outl} |")
    L += ["", f"## Peak memory (MB; {res['memory_note']})", "",
          "| model | mode | method | peak | baseline | above baseline | host RAM per snapshot, memory / bf16 |",
          "|" + "---|" * 7]
    for r in res["memory"]:
        snap = res["extra"].get(r["model"], {}).get(f"snapshot_mb_{r['mode']}", {})
        s = f"{snap['memory']:.1f} / {snap['memory_bf16']:.1f}" if snap and r["method"] != "sft" else "-"
        L.append(f"| {r['model']} | {r['mode']} | {r['method']} | {r['peak_mb']:.0f} | "
                 f"{r['baseline_mb']:.0f} | {r['above_baseline_mb']:.0f} | {s} |")
    L += ["", "## Ratios against the targets", "", "| model | mode | ratio | value | target | met |",
          "|" + "---|" * 6]
    for r in res["ratios"]:
        target = "-" if r["target"] is None else f"<= {r['target']:.2f}"
        met = "reported" if r["met"] is None else "yes" if r["met"] else f"no, {r['over_pp']:.1f} pp over"
        note = f" ({r['note']})" if r["note"] else ""
        L.append(f"| {r['model']} | {r['mode']} | {r['ratio']}{note} | {r['value']:.3f} | {target} | {met} |")
    L += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    path.write_text("\n".join(L) + "\n")


# The report's notes are this module's docstring, less the usage lines: one text to maintain.
def merge_previous(res: dict, path: Path) -> None:
    """Keep the rows of models this run did not measure from an earlier bench.json (e.g. a GPU
    run of sd15 keeps the CPU's digits rows), with a note naming where they came from."""
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    kept = [m for m in old.get("profiles", {}) if m not in res["profiles"]]
    if not kept:
        return
    for key in ("timings", "memory", "ratios"):
        res[key] = [r for r in old.get(key, []) if r["model"] in kept] + res[key]
    res["profiles"] = {**{m: old["profiles"][m] for m in kept}, **res["profiles"]}
    res["extra"] = {**{m: v for m, v in old.get("extra", {}).items() if m in kept}, **res["extra"]}
    om = old.get("machine", {})
    res["notes"] = res["notes"] + [f"Rows of {', '.join(kept)} are kept from an earlier run: "
                                   f"`{old.get('command')}` on {om.get('cpu')} {om.get('gpu', '')}, "
                                   f"device `{om.get('device')}`, {om.get('date')}."]


