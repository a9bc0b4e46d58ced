"""research/benchmark.py: the digits table, the claims with their verdicts, and the quick end-to-end run."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import HANG_GUARD_S
from research import benchmark, loser_frontier, report


def _fake_results(methods=("base", "sft", "sspo"), seeds=2):
    rng = np.random.default_rng(0)
    keys = [f"{c}/{m}" for c in ("id_cfg", "id_nocfg", "ood_cfg", "ood_nocfg") for m in ("accuracy", "confidence", "frechet")]
    runs = {name: [{"seed": s, "final": {k: float(rng.uniform()) for k in keys},
                    "curve": [] if name == "base" else [(st, {f"{c}/{m}": float(rng.uniform()) for c in benchmark.CURVE_CONDITIONS
                                                               for m in ("accuracy", "confidence", "frechet")}) for st in (0, 5, 10)],
                    "memo": {"nn_ratio": float(rng.uniform()), "diversity": float(rng.uniform())},
                    "ssr": [(5, 0.3), (10, 0.5)] if "sspo" in name else []} for s in range(seeds)] for name in methods}
    return {"size": benchmark.SIZES["quick"], "judge_accuracy": 0.98, "date": "today", "runs": runs}


def _recorded(tmp_path):
    """A finished claims run of every method (3 seeds) as --from-json reads it: (results, path);
    its runs' models are gone, as on a machine without results/runs/."""
    results = _fake_results(tuple(benchmark.METHODS), seeds=3)
    for runs in results["runs"].values():
        for r in runs:
            r["run_dir"] = str(tmp_path / "gone")
    results.update(seconds=60.0, tuned={}, command="python -m research.benchmark claims --jobs 2")
    src = tmp_path / "recorded.json"
    src.write_text(json.dumps(results))
    return results, src


def test_table_markdown_and_plots(tmp_path):
    results = _fake_results()
    summary = report.summarize(results)
    acc = [r["final"]["ood_nocfg/accuracy"] for r in results["runs"]["sft"]]
    assert summary["sft"]["ood_nocfg/accuracy"] == pytest.approx([np.mean(acc), np.std(acc)])
    report.write_table_md(results, summary, tmp_path / "table.md", "python -m research.benchmark table --quick")
    md = (tmp_path / "table.md").read_text()
    assert md.count("| sspo |") == 4 and "python -m research.benchmark table --quick" in md and "0.9800" in md
    assert f"{np.mean(acc):.3f} ± {np.std(acc):.3f}" in md
    paths = report.plot_curves(results, tmp_path)
    assert [p.name for p in paths] == ["curve_accuracy.png", "curve_confidence.png", "curve_frechet.png", "ssr_rate.png"]
    assert all(Image.open(p).size[0] > 300 for p in paths)


def test_claims_from_results_cover_the_paper_and_follow_the_rule():
    methods = tuple(benchmark.METHODS)
    results = _fake_results(methods, seeds=3)
    for r in results["runs"]["sspo"]:  # SSPO clearly ahead of SFT on every seed
        r["final"]["id_cfg/accuracy"] = 0.9
    for i, r in enumerate(results["runs"]["sft"]):
        r["final"]["id_cfg/accuracy"] = 0.5 + 0.01 * i
    for r in results["runs"]["sspo"]:  # ... and clearly behind it without guidance
        r["final"]["id_nocfg/accuracy"] = 0.3
    for i, r in enumerate(results["runs"]["sft"]):
        r["final"]["id_nocfg/accuracy"] = 0.6 + 0.01 * i
    rows = {r["claim"]: r for r in report.build_claims(results)}
    assert rows["Table 1: SSPO beats sft (training templates, guidance 3)"]["verdict"] == "supported"
    assert rows["Table 1: SSPO beats sft (training templates, no guidance)"]["verdict"] == "not supported"
    for key in ("Table 6: SSPO beats sspo ssr=none", "Fig. 2: last-checkpoint replay overfits",
                "Fig. 4: the SSR rate rises", "Fig. 9: SSPO keeps improving", "SFT memorizes",
                "SDPO paper: dpo_cm beats Diffusion-DPO", "SDPO paper: sdpo is more stable"):
        assert any(c.startswith(key) for c in rows), key
    ssr = rows["Fig. 4: the SSR rate rises during training"]  # fake SSR goes 0.3 -> 0.5 on every seed
    assert ssr["diff"] == pytest.approx(0.2) and ssr["verdict"] == "supported"


def test_quick_table_end_to_end(tmp_path):
    """`python -m research.benchmark claims --quick` (CI size): every method x seed trained and judged,
    table.md / table.json / plots written. Its numbers are meaningless at this size."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "research.benchmark", "claims", "--quick", "--jobs", "2",
                        "--out", str(tmp_path)], cwd=root, capture_output=True, text=True,
                       timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "table.json").read_text())
    assert list(res["runs"]) == list(benchmark.METHODS)
    assert all(len(runs) == res["size"]["seeds"] for runs in res["runs"].values())
    md = (tmp_path / "table.md").read_text()
    assert all(f"| {name} |" in md for name in benchmark.METHODS)
    claims_md = (tmp_path / "claims.md").read_text()
    assert "Table 1: SSPO beats sft (training templates, no guidance)" in claims_md and "SFT memorizes" in claims_md
    assert all(r["memo"]["nn_ratio"] > 0 for runs in res["runs"].values() for r in runs)
    for png in ("curve_accuracy.png", "curve_confidence.png", "curve_frechet.png", "ssr_rate.png", "samples_grid.png"):
        assert (tmp_path / png).stat().st_size > 1000
    sspo = res["runs"]["sspo"][0]
    assert sspo["ssr"] and all(0 <= v <= 1 for _, v in sspo["ssr"])


def test_run_table_trains_the_given_specs_with_the_tuned_lr(tmp_path):
    """The frontier's path: settings that are not benchmark.METHODS, with the sweep's lr/beta
    under their own keys (a run once looked its spec up in METHODS and failed)."""
    size = {**benchmark.SIZES["quick"], "seeds": 1, "n_final": 10, "n_curve": 10,
            "train": {**benchmark.SIZES["quick"]["train"], "max_steps": 2, "save_every": 2}}
    spec = {"method": "sspo", "loser_every": 2, "loser_steps": 2}
    res = benchmark.run_table(tmp_path, size, specs={"base": None, "my setting": spec},
                              tuned={"sspo": {"lr": 1e-5, "beta": 100.0, "admissible": True}})
    run = res["runs"]["my setting"][0]
    assert run["settings"] == {"lr": 1e-5, "beta": 100.0, **spec}
    cfg = json.loads((Path(run["run_dir"]) / "config.json").read_text())
    assert cfg["lr"] == 1e-5 and cfg["loser_every"] == 2


def test_run_table_checks_every_setting_before_training_and_frontier_sizes_are_valid(tmp_path):
    size = {**benchmark.SIZES["quick"], "seeds": 1}
    bad = {"base": None, "ok": {"method": "sspo"}, "bad": {"method": "sspo", "loser_every": 3}}  # save_every 2
    with pytest.raises(ValueError, match="multiple of 'loser_every'"):
        benchmark.run_table(tmp_path, size, specs=bad)
    assert not (tmp_path / "runs").exists()  # nothing trained
    import config
    for size in benchmark.FRONTIER_SIZES.values():  # every frontier setting is a valid config at each size
        for spec in loser_frontier.FRONTIER.values():
            config.resolve({**size["train"], **spec})


def test_claims_from_json_rewrites_reports_without_training(tmp_path, capsys):
    """`claims --from-json`: verdicts, tables and curves from a recorded table.json; without the
    runs' models (not in git) the grid is left alone and the command says so."""
    results, src = _recorded(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    benchmark.main(["claims", "--quick", "--from-json", str(src), "--out", str(out)])
    claims = (out / "claims.md").read_text()
    assert "`python -m research.benchmark claims --jobs 2`" in claims and "Rewritten from" in claims
    assert f"by `python -m research.benchmark claims --quick --from-json {src} --out {out}`" in claims
    assert "Table 1: SSPO beats sft (training templates, no guidance)" in claims
    assert (out / "curve_accuracy.png").exists() and not (out / "samples_grid.png").exists()
    assert "not rewritten" in capsys.readouterr().out


def test_frontier_markdown_plot_and_costs(tmp_path):
    names = ["ddim 10, cfg 3, every 1", "dpmsolver++ 4, cfg 3, every 4"]
    results = _fake_results(methods=names, seeds=3)
    results.update(costs={n: {"ratio": 1.0 + i, "q1": 0.9 + i, "q3": 1.2 + i, "sspo_ms": 5.0, "dpo_ms": 2.0}
                          for i, n in enumerate(names)},
                   cost_batch=16, cost_repeats=7, summary=report.summarize(results))
    loser_frontier.write(results, tmp_path, "python -m research.benchmark frontier --quick")
    md = (tmp_path / "loser_frontier.md").read_text()
    acc = [r["final"]["id_cfg/accuracy"] for r in results["runs"][names[1]]]
    row = next(line for line in md.splitlines() if line.startswith(f"| {names[1]} |"))
    assert "| 2.00 [1.90, 2.20] |" in row and f"{np.mean(acc):.3f} ± {np.std(acc):.3f}" in row
    assert "python -m research.benchmark frontier --quick" in md
    assert row.endswith("| yes |") == loser_frontier.held(results["summary"], names[1], names[0])
    assert Image.open(tmp_path / "loser_frontier.png").size[0] > 300
    # a subset of settings always runs the reference first (held needs it), each once
    assert list(loser_frontier.selected(["unipc 6, cfg 3, every 2"])) == [names[0], "unipc 6, cfg 3, every 2"]
    assert list(loser_frontier.selected([names[1], names[0]])) == names
    assert list(loser_frontier.selected(None)) == list(loser_frontier.FRONTIER)
    # held: inside the reference's seed spread (acc >= mean - std, FD <= mean + std) in every condition
    ref = {f"{c}/{k}": v for c in loser_frontier.CONDITIONS for k, v in (("accuracy", [0.9, 0.02]), ("frechet", [2.0, 0.3]))}
    def summary(**changes):
        return {"ref": ref, "x": {**ref, **{k.replace("__", "/"): [v, 0.1] for k, v in changes.items()}}}
    assert loser_frontier.held(summary(id_cfg__accuracy=0.881), "x", "ref")
    assert not loser_frontier.held(summary(ood_cfg__accuracy=0.879), "x", "ref")
    assert loser_frontier.held(summary(id_cfg__frechet=2.29, ood_cfg__accuracy=0.99), "x", "ref")
    assert not loser_frontier.held(summary(ood_cfg__frechet=2.31), "x", "ref")
    # the choice: the cheapest setting that holds, never the reference itself
    both = {**summary(), "y": ref, "z": {**ref, "id_cfg/accuracy": [0.5, 0.0]}}
    cost = lambda **r: {k: {"ratio": v} for k, v in r.items()}
    assert loser_frontier.cheapest_held(both, cost(ref=1.0, x=3.0, y=2.0, z=0.5), "ref") == "y"
    assert loser_frontier.cheapest_held(both, cost(ref=1.0, x=1.5, y=2.0, z=0.5), "ref") == "x"
    assert loser_frontier.cheapest_held(both, cost(ref=1.0, z=0.5), "ref") is None
    choice = loser_frontier.cheapest_held(results["summary"], results["costs"], names[0])
    assert (f"holds the digits preset's quality: **{choice}**" if choice else "none; only") in md
    # the cost measurement itself (loop.update on digits, batch 2, one repeat): per update of a cycle
    costs = loser_frontier.costs({n: loser_frontier.FRONTIER[n] for n in names}, batch=2, repeats=1, log=lambda s: None)
    assert set(costs) == set(names) and all(c["ratio"] > 0 and c["dpo_ms"] > 0 for c in costs.values())


def test_sweep_rule_rejects_unrealistic_settings_and_tuned_passes_only_lr_beta():
    rows = [{"lr": 1e-3, "beta": 500.0, "accuracy": 0.95, "frechet": 9.0},   # accurate, not digit-like
            {"lr": 3e-4, "beta": 500.0, "accuracy": 0.80, "frechet": 1.5},
            {"lr": 1e-4, "beta": 2500.0, "accuracy": 0.80, "frechet": 1.2}]  # same accuracy, lower FD
    assert report.choose(rows, base_frechet=1.0) == {"lr": 1e-4, "beta": 2500.0, "admissible": True}
    # with a permissive ratio the accurate unrealistic setting wins: the FD bound is what rejects it
    assert report.choose(rows, base_frechet=1.0, max_ratio=10.0)["lr"] == 1e-3
    # nothing admissible -> the most realistic one, marked
    assert report.choose(rows, base_frechet=0.1) == {"lr": 1e-4, "beta": 2500.0, "admissible": False}
    tuned = {"sspo": {"lr": 3e-4, "beta": 500.0, "admissible": True}}
    assert benchmark._tuned({"method": "sspo", "ssr": "none"}, tuned) == {
        "lr": 3e-4, "beta": 500.0, "method": "sspo", "ssr": "none"}
    assert benchmark._tuned({"method": "sft", "lr": 1e-5}, tuned) == {"method": "sft", "lr": 1e-5}


def test_default_run_table_comes_from_eval_json(tmp_path):
    keys = ("id_cfg/accuracy", "id_cfg/accuracy_rf", "id_nocfg/accuracy", "ood_cfg/accuracy",
            "ood_nocfg/accuracy", "id_cfg/frechet")
    ev = {"judge_real_accuracy": 0.99, "base": {k: 0.1 + i / 100 for i, k in enumerate(keys)},
          "final": {k: 0.5 + i / 100 for i, k in enumerate(keys)}}
    md = report.default_run_markdown(ev)
    assert "| training templates, guidance 3 (SVC / RandomForest) | 0.100 / 0.110 | 0.500 / 0.510 |" in md
    assert "| held-out templates, no guidance | 0.140 | 0.540 |" in md
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- results:default -->\nold\n<!-- /results:default -->\nb\n")
    report.update_readme("default", md, readme)
    text = readme.read_text()
    assert "old" not in text and "0.500 / 0.510" in text and text.startswith("a\n") and text.endswith("b\n")


def test_claims_with_the_calibrated_noise_condition_first(tmp_path):
    """`claims --from-json T --calibrated noise.json`: the claims at pair_noise = 0.2 (from the
    noise sweep's runs) come first as the main condition, the clean pairs' after them; an
    inconclusive verdict says how many seeds would decide it."""
    results, src = _recorded(tmp_path)
    level = {"runs": {k: results["runs"][k] for k in ("base", "sft", "dpo", "sspo")}}
    noisy = {"levels": [0.0, 0.2], "per_level": {"0.2": level}, "size": {"seeds": 3}, "date": "d",
             "command": "python -m research.benchmark noise --jobs 2"}
    (tmp_path / "noise.json").write_text(json.dumps(noisy))
    out = tmp_path / "out"
    out.mkdir()
    benchmark.main(["claims", "--quick", "--from-json", str(src), "--calibrated", str(tmp_path / "noise.json"),
                    "--out", str(out)])
    text = (out / "claims.md").read_text()
    noisy_at, clean_at = text.index("## Noisy pairs, pair_noise = 0.2"), text.index("## Clean pairs")
    assert noisy_at < clean_at
    assert "Table 1: SSPO beats dpo (training templates, no guidance)" in text[noisy_at:clean_at]
    assert "Table 6" not in text[noisy_at:clean_at] and "Table 6" in text[clean_at:]  # ablations ran clean only
    with pytest.raises(SystemExit, match="no pair_noise = 0.2 level"):
        noisy["per_level"] = {"0.4": level}
        (tmp_path / "noise.json").write_text(json.dumps(noisy))
        benchmark.main(["claims", "--quick", "--from-json", str(src), "--calibrated", str(tmp_path / "noise.json"),
                        "--out", str(out)])


def test_calibrated_claims_gather_several_sources_and_long_runs(tmp_path):
    """`--calibrated noise.json table.json --long long.json`: the noisy section joins the noise
    sweep's runs with a claims run at the same pair_noise (so the ablations' Table 6 rows appear
    there), leaves the curve claims to the long runs' own section, and refuses a source at another
    noise level or one adding nothing; a method in two sources comes from the first."""
    results, src = _recorded(tmp_path)
    pick = lambda *names: {k: results["runs"][k] for k in names}  # noqa: E731
    noisy = {"levels": [0.2, 0.4], "per_level": {"0.2": {"runs": pick("base", "sft", "dpo", "sspo")}},
             "size": {"seeds": 3, "train": {"max_steps": 300}}, "date": "d9", "command": "later-cmd",
             "commands": [{"command": "noise-cmd", "date": "d1", "seconds": 1.0, "levels": [0.2]},
                          {"command": "later-cmd", "date": "d9", "seconds": 1.0, "levels": [0.4]}]}
    size02 = {**results["size"], "train": {"max_steps": 300, "pair_noise": 0.2}}
    others = {"runs": pick("base", "sspo ssr=none", "sspo replay=initial"), "size": size02,
              "date": "d2", "command": "others-cmd"}
    long = {"runs": pick("base", "sft", "sspo", "sspo replay=last"), "date": "d3", "command": "long-cmd",
            "seconds": 600.0, "size": {**size02, "curve_points": 12, "train": {"max_steps": 1200, "pair_noise": 0.2}}}
    for name, data in (("noise", noisy), ("others", others), ("long", long)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    out.mkdir()
    argv = ["claims", "--quick", "--from-json", str(src), "--out", str(out), "--calibrated",
            str(tmp_path / "noise.json"), str(tmp_path / "others.json"), "--long", str(tmp_path / "long.json")]
    benchmark.main(argv)
    text = (out / "claims.md").read_text()
    noisy_at, long_at, clean_at = (text.index(h) for h in ("## Noisy pairs", "## Long runs: 1200 updates",
                                                            "## Clean pairs"))
    assert noisy_at < long_at < clean_at
    noisy_md, long_md = text[noisy_at:long_at], text[long_at:clean_at]
    assert "Table 6: SSPO beats sspo ssr=none" in noisy_md and "`others-cmd`" in noisy_md and "`noise-cmd`" in noisy_md
    assert "| Fig." not in noisy_md and "| Fig. 2" in long_md and "| Fig. 9" in long_md and "| Fig. 4" in long_md
    assert "Table 6: SSPO beats sspo ssr=none" not in long_md  # the long runs hold no such ablation
    others["size"] = results["size"]  # trained on clean pairs: not a source for the noisy section
    (tmp_path / "others.json").write_text(json.dumps(others))
    with pytest.raises(SystemExit, match="trained at pair_noise = 0, not 0.2"):
        benchmark.main(argv)
    others.update(size=size02, runs=pick("base", "sspo"))  # sspo already comes from noise.json
    (tmp_path / "others.json").write_text(json.dumps(others))
    with pytest.raises(SystemExit, match="every method in it already comes from an earlier source"):
        benchmark.main(argv)
    # a method in two sources comes from the first: a re-tuned SFT listed before the noise sweep's
    sft = [dict(r, final={**r["final"], "id_cfg/accuracy": 0.123}) for r in results["runs"]["sft"]]
    others.update(runs={"base": results["runs"]["base"], "sft": sft})
    (tmp_path / "others.json").write_text(json.dumps(others))
    benchmark.main(["claims", "--quick", "--from-json", str(src), "--out", str(out), "--calibrated",
                    str(tmp_path / "others.json"), str(tmp_path / "noise.json")])
    text = (out / "claims.md").read_text()
    noisy_md = text[text.index("## Noisy pairs"):text.index("## Clean pairs")]
    assert "sft: 0.123 ± 0.000" in noisy_md and "`others-cmd` (d2: sft)" in noisy_md
    assert "`noise-cmd` (d1: dpo, sspo)" in noisy_md and "later-cmd" not in noisy_md  # the command of level 0.2


def test_noise_levels_added_later_join_the_recorded_ones(tmp_path, monkeypatch):
    """`noise --levels 0.1 0.3` after `noise --levels 0 0.2`: noise.json holds all four levels and
    both commands (each with its levels); a level run again replaces its old runs; a run at other
    sizes starts over rather than mixing."""
    calls, seen = [], []

    def fake_table(out, size, jobs, specs, tuned):
        calls.append(size["train"]["pair_noise"])
        f = tmp_path / "noise.json"  # what a reader finds while this level trains
        seen.append(json.loads(f.read_text())["levels"] if f.exists() else [])
        return {"runs": {n: [{"final": {f"{c}/{k}": 0.5 for c in ("id_cfg", "id_nocfg", "ood_cfg", "ood_nocfg")
                                        for k in ("accuracy", "frechet")}, "tag": len(calls)}] * 2 for n in specs}}
    monkeypatch.setattr(benchmark, "run_table", fake_table)
    out = ["--quick", "--out", str(tmp_path)]
    benchmark.main(["noise", "--levels", "0", "0.2", *out])
    benchmark.main(["noise", "--levels", "0.1", "0.3", *out])
    res = json.loads((tmp_path / "noise.json").read_text())
    assert res["levels"] == [0.0, 0.1, 0.2, 0.3] and calls == [0.2, 0.0, 0.1, 0.3]
    assert [c["levels"] for c in res["commands"]] == [[0.0, 0.2], [0.1, 0.3]]
    md = (tmp_path / "noise.md").read_text()
    assert "--levels 0 0.2" in md and "--levels 0.1 0.3" in md and "| p = 0.3 |" in md
    benchmark.main(["noise", "--levels", "0.2", "0.3", *out])  # rerun levels: their runs are the new ones
    res = json.loads((tmp_path / "noise.json").read_text())
    assert res["per_level"]["0.2"]["runs"]["sft"][0]["tag"] == 5 and res["levels"] == [0.0, 0.1, 0.2, 0.3]
    assert [c["levels"] for c in res["commands"]] == [[0.0], [0.1], [0.2, 0.3]]
    assert seen[-1] == [0.0, 0.1, 0.2]  # while 0.3 is retrained, its old runs are no longer on record
    benchmark.main(["noise", "--levels", "0", "0.4", "--seeds", "3", *out])  # other sizes: start over
    assert json.loads((tmp_path / "noise.json").read_text())["levels"] == [0.0, 0.4]


def test_noise_merge_joins_a_sweep_trained_elsewhere(tmp_path, monkeypatch):
    """`noise --merge B/noise.json`: the levels of a sweep trained in another folder join
    <out>/noise.json without training (both commands named with their levels); a sweep at other
    seeds is refused; the memorization and curve sizes, which noise.md does not use, may differ."""
    def fake_table(out, size, jobs, specs, tuned):
        return {"runs": {n: [{"final": {f"{c}/{k}": size["train"]["pair_noise"] for c in
                                        ("id_cfg", "id_nocfg", "ood_cfg", "ood_nocfg") for k in ("accuracy", "frechet")}}] * 2
                         for n in specs}}
    monkeypatch.setattr(benchmark, "run_table", fake_table)
    a, b = tmp_path / "a", tmp_path / "b"
    benchmark.main(["noise", "--levels", "0", "0.2", "--quick", "--out", str(a)])
    benchmark.main(["noise", "--levels", "0.1", "--quick", "--out", str(b)])
    rec = json.loads((a / "noise.json").read_text())
    rec["size"]["memo_steps"] = 99  # not a size noise.md depends on
    (a / "noise.json").write_text(json.dumps(rec))
    monkeypatch.setattr(benchmark, "run_table", None)  # merging trains nothing
    benchmark.main(["noise", "--merge", str(b / "noise.json"), "--out", str(a)])
    res = json.loads((a / "noise.json").read_text())
    assert res["levels"] == [0.0, 0.1, 0.2] and res["per_level"]["0.1"]["runs"]["sft"][0]["final"]["id_cfg/accuracy"] == 0.1
    assert [c["levels"] for c in res["commands"]] == [[0.0, 0.2], [0.1]]
    assert "--out " + str(b) in (a / "noise.md").read_text()
    other = json.loads((b / "noise.json").read_text())
    other["size"]["seeds"] = 5
    (b / "noise.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="cannot share a report"):
        benchmark.main(["noise", "--merge", str(b / "noise.json"), "--out", str(a)])
