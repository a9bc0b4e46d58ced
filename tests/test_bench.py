"""research/bench.py's bookkeeping (never absolute speed): timing scales with work, the statistics
helpers, the peak-memory child, the ratios against targets and the markdown report."""

import pytest
import torch

from conftest import HANG_GUARD_S
from research import bench, bench_report


def test_summarize_known_inputs():
    s = bench.summarize([5.0, 1.0, 4.0, 2.0, 3.0])  # order must not matter
    assert (s["median_ms"], s["q1_ms"], s["q3_ms"], s["iqr_ms"], s["n"]) == (3.0, 2.0, 4.0, 2.0, 5)
    s = bench.summarize([1.0, 2.0, 3.0, 4.0])  # numpy's linear interpolation
    assert s["median_ms"] == 2.5 and s["q1_ms"] == 1.75 and s["q3_ms"] == 3.25 and s["iqr_ms"] == 1.5
    assert s["outliers_ms"] == []
    # Tukey's fences: q1 3, q3 7, IQR 4 -> [-3, 13]: 13 is in, 100 is out (reported, not dropped)
    assert bench.summarize([1.0, 2, 3, 4, 5, 6, 7, 8, 13])["outliers_ms"] == []
    s = bench.summarize([1.0, 2, 3, 4, 5, 6, 7, 8, 100])
    assert s["outliers_ms"] == [100.0] and s["n"] == 9 and s["median_ms"] == 5.0


def test_measure_warmup_repeats_and_sync():
    calls, syncs = {"a": 0, "b": 0}, []
    fns = {k: (lambda k=k: calls.__setitem__(k, calls[k] + 1)) for k in calls}
    times = bench.measure(fns, warmup=2, repeats=3, sync=lambda: syncs.append(1), log=lambda s: None)
    assert calls == {"a": 5, "b": 5}  # warm-up calls run but are not recorded
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert len(syncs) == 2 * 10 and all(t >= 0 for v in times.values() for t in v)


def test_twice_the_forwards_reports_about_twice_the_time():
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine, OpenMP spin-waiting adds noise
    try:
        _check_twice()
    finally:
        torch.set_num_threads(n_threads)


def _check_twice():
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    x = torch.randn(256, 256)

    def forwards(n):
        def fn():
            for _ in range(n):
                net(x).sum().backward()
        return fn

    times = bench.measure({"once": forwards(1), "twice": forwards(2)}, warmup=2, repeats=9,
                          log=lambda s: None)
    ratio = bench.summarize(times["twice"])["median_ms"] / bench.summarize(times["once"])["median_ms"]
    assert 1.3 <= ratio <= 3.0, ratio


def test_cycle_times_the_presets_micro_steps_and_one_sampling_call_per_group(monkeypatch):
    """bench's "full SSPO step at the preset's loser settings": an update of `accum` micro-steps
    whose losers are sampled `batch` pairs per call, as loop.update runs the SD-1.5 preset."""
    import config
    import loop
    from models import sampling
    from research.bench_harness import Harness
    preset = config.load_preset("sd15_pickapic")
    lo = bench.preset_losers("sd15")
    assert (lo["steps"], lo["every"], lo["batch"]) == (preset["loser_steps"], preset["loser_every"],
                                                       preset.get("loser_batch", 0))
    assert lo["accum"] == max(1, lo["batch"] // preset["batch_size"])
    p = dict(bench.profile("digits", cuda=False, quick=True), batch=2, storage="memory")
    h = Harness("digits", False, p, torch.device("cpu"), storages=("memory",))
    samples, steps = [], []
    real_sample, real_step = sampling.sample, loop.training_step
    monkeypatch.setattr(sampling, "sample", lambda b, f, prompts, *a, **k: samples.append(len(prompts))
                        or real_sample(b, f, prompts, *a, **k))
    monkeypatch.setattr(loop, "training_step", lambda run, batch, step: steps.append(run.method.loss)
                        or real_step(run, batch, step))
    loser = {"scheduler": "ddim", "steps": 2, "guidance": 3.0, "every": 1, "batch": 4, "accum": 3}
    h.step("sft")  # builds the optimizer
    samples.clear(), steps.clear()
    assert h.cycle("sspo", loser, 0) == 1
    assert samples == [4, 2] and steps == ["sspo"] * 3  # 3 micro-steps; losers of 2 + 1 micro-batches
    samples.clear(), steps.clear()
    h.cycle("dpo", loser, 1)
    assert samples == [] and steps == ["dpo"] * 3


def test_child_peak_rss_grows_with_an_allocation():
    small = bench.run_child({"kind": "alloc", "mb": 0, "device": "cpu"})
    big = bench.run_child({"kind": "alloc", "mb": 400, "device": "cpu"})
    assert small["device"] == big["device"] == "cpu-rss"
    assert big["peak_mb"] - small["peak_mb"] > 300
    assert big["above_baseline_mb"] > 300 and small["above_baseline_mb"] < 100


def _results():
    timings = [dict(model="toy", mode=mode, measure=k, median_ms=v, q1_ms=v - 1, q3_ms=v + 1,
                    iqr_ms=2.0, n=3)
               for mode in ("ft", "lora")
               for k, v in dict(sft=50.0, dpo=100.0, sspo_nogen=110.0, sspo=200.0, gen_cfg=90.0,
                                gen_nocfg=50.0, swap_memory=1.0, swap_disk=3.0, dpo_update=100.0,
                                sspo_preset=190.0, gen_preset=80.0).items()]
    memory = [dict(model="toy", mode=mode, method=k, peak_mb=v + 500, baseline_mb=500.0,
                   above_baseline_mb=v, device="cpu-rss")
              for mode in ("ft", "lora") for k, v in dict(sft=100.0, dpo=200.0, sspo=204.0).items()]
    profiles = {"toy": bench.profile("digits", cuda=False, quick=True)}
    sd15 = [dict(t, model="sd15") for t in timings if t["mode"] == "lora"]
    profiles["sd15"] = bench.profile("sd15", cuda=False, quick=False)
    return timings + sd15, memory, profiles


def test_ratios_against_targets():
    timings, memory, profiles = _results()
    rows = {(r["mode"], r["ratio"]): r for r in bench_report.ratio_rows(timings, memory, profiles) if r["model"] == "toy"}
    r = rows[("lora", "SSPO step w/o generation / DPO step")]
    assert r["value"] == pytest.approx(1.1) and r["met"] is False and r["over_pp"] == pytest.approx(5.0)
    r = rows[("ft", "SSPO memory / DPO memory")]
    assert r["value"] == pytest.approx(1.02) and r["met"] is True and r["over_pp"] is None
    r = rows[("lora", "SSPO memory / SFT memory")]
    assert r["value"] == pytest.approx(2.04) and r["met"] is False
    r = rows[("lora", "swap (memory) / full SSPO step")]
    assert r["value"] == pytest.approx(0.005) and r["met"] is True
    assert rows[("ft", "swap (memory) / full SSPO step")]["target"] is None  # target is LoRA only
    assert rows[("lora", "generation (10 ddim steps, CFG) / full SSPO step")]["value"] == pytest.approx(0.45)
    r = rows[("lora", "full SSPO step / DPO step at the preset's loser settings")]
    assert r["value"] == pytest.approx(1.9) and r["target"] is None  # the 1.8 target is SD-1.5's
    sd = {r["ratio"]: r for r in bench_report.ratio_rows(timings, memory, profiles) if r["model"] == "sd15"}
    r = sd["full SSPO step / DPO step at the preset's loser settings"]
    assert r["value"] == pytest.approx(1.9) and r["target"] == 1.8 and r["met"] is False
    # derived: 9 ms per CFG step x 10 steps / (that + 110 ms step + 1 ms swap)
    assert rows[("lora", "generation share at the preset's 10 steps (derived)")]["value"] == \
        pytest.approx(90 / (90 + 111))


def test_markdown_has_the_expected_rows(tmp_path):
    timings, memory, profiles = _results()
    res = {"command": "python -m research.bench --quick", "runtime_s": 12.0, "profiles": profiles,
           "machine": {"cpu": "Toy CPU", "cores": 2, "torch_threads": 2, "ram_gb": 8, "device": "cpu",
                       "torch": "x", "diffusers": "y", "transformers": "z", "peft": "w",
                       "python": "3.11", "date": "2025-01-01", "loadavg_start": [0.0]},
           "timings": timings, "memory": memory, "memory_note": "CPU peak RSS",
           "extra": {"toy": {"snapshot_mb_ft": {"memory": 4.0, "memory_bf16": 2.0}}},
           "ratios": bench_report.ratio_rows(timings, memory, profiles), "notes": ["a note"]}
    path = tmp_path / "bench.md"
    bench_report.write_markdown(res, path)
    text = path.read_text()
    assert "Toy CPU" in text and "`python -m research.bench --quick`" in text
    assert "| toy | lora | Diffusion-DPO step | 100.0 | 2.0 | 99.0 - 101.0 | 3 | - |" in text
    assert ("| sd15 | lora | full SSPO step / DPO step at the preset's loser settings | 1.900 | <= 1.80 | "
            "no, 10.0 pp over |") in text
    assert "| toy | ft | checkpoint swap, pool memory | 1.0 |" in text
    assert "| toy | ft | dpo | 700 | 500 | 200 | 4.0 / 2.0 |" in text
    assert "| toy | lora | SSPO step w/o generation / DPO step | 1.100 | <= 1.05 | no, 5.0 pp over |" in text
    assert "| toy | ft | SSPO memory / DPO memory | 1.020 | <= 1.05 | yes |" in text
    assert "- a note" in text


def test_quick_benchmark_end_to_end(tmp_path):
    """`python -m research.bench --quick` (what CI runs) writes the table and every ratio row."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "research.bench", "--quick", "--out", str(tmp_path)],
                       cwd=root, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    measures = {(t["mode"], t["measure"]) for t in res["timings"]}
    for mode in ("ft", "lora"):
        for m in ("sft", "dpo", "sspo_nogen", "sspo", "gen_cfg", "gen_nocfg", "dpo_update", "sspo_preset",
                  "gen_preset"):
            assert (mode, m) in measures
    assert all(t["median_ms"] > 0 for t in res["timings"])
    md = (tmp_path / "bench.md").read_text()
    assert "SSPO step w/o generation / DPO step" in md and "SSPO memory / DPO memory" in md
    assert "full SSPO step / DPO step at the preset's loser settings" in md
