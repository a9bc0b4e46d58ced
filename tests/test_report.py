"""The claim table's verdict rule and the memorization measure (research/report.py)."""
import numpy as np
import pytest
import scipy.stats
import torch

from research import report as claims
import digits


def test_t_quantiles_match_scipy():
    for df in (1, 2, 3, 4, 9, 30):
        assert claims.t_quantile(df) == pytest.approx(scipy.stats.t.ppf(0.975, df), abs=1e-3)
    assert claims.t_quantile(12) >= scipy.stats.t.ppf(0.975, 12)  # conservative between rows


def test_interval_matches_scipy_and_verdicts():
    d = [0.30, 0.10, 0.20]
    mean, low, high = claims.interval(d)
    lo, hi = scipy.stats.t.interval(0.95, 2, loc=np.mean(d), scale=scipy.stats.sem(d))
    assert (mean, low, high) == pytest.approx((0.2, lo, hi), abs=1e-3)
    assert claims.verdict([0.30, 0.28, 0.32]) == "supported"
    assert claims.verdict([-0.30, -0.28, -0.32]) == "not supported"
    assert claims.verdict([0.30, -0.10, 0.05]) == "inconclusive"  # within the seeds' noise
    assert claims.verdict([0.02, 0.03, 0.02]) == "supported"  # small but consistent
    with pytest.raises(ValueError):
        claims.verdict([0.1])


def test_claim_row_lower_is_better_flips_the_sign():
    row = claims.claim_row("FD", "frechet", "sspo", "sft", [1.0, 1.1, 0.9], [2.0, 2.1, 2.2],
                           higher_is_better=False)
    assert row["verdict"] == "supported" and row["diff"] == pytest.approx(1.1)
    row = claims.claim_row("acc", "accuracy", "sspo", "sft", [1.0, 1.1, 0.9], [2.0, 2.1, 2.2])
    assert row["verdict"] == "not supported"
    assert "**not supported**" in claims.claims_markdown([row], "# t")


def test_memorization_tells_copying_from_generalising():
    splits = digits.load_digits_splits()
    x, y = splits["align"]
    align, heldout = x[:60], splits["eval"][0][:60]
    copies = align[torch.arange(60) % 20] + 0.01 * torch.randn(60, 1, 8, 8)  # 20 memorised images
    fresh = splits["pretrain"][0][:60]  # real digits the "model" never saw
    m_copy = claims.memorization(copies, y[:60][torch.arange(60) % 20].numpy(), align, heldout)
    m_fresh = claims.memorization(fresh, splits["pretrain"][1][:60].numpy(), align, heldout)
    assert m_copy["nn_ratio"] < 0.1 and 0.8 < m_fresh["nn_ratio"] < 1.25
    assert m_copy["diversity"] < m_fresh["diversity"]
    with pytest.raises(ValueError):
        claims.memorization(fresh, np.zeros(60), align, heldout[:10])


def test_labelled_grid_size_and_ink():
    rows = {"base": -torch.ones(10, 1, 8, 8), "sspo": torch.ones(10, 1, 8, 8)}
    img = claims.labelled_grid(rows, cell=48)
    assert img.size == (150 + 10 * 52, 24 + 2 * 52)
    a = np.asarray(img)
    assert a[24 + 10, 150 + 10] == 255 and a[24 + 52 + 10, 150 + 10] == 0  # background row white, ink row black


def test_realism_turns_an_accuracy_win_with_unreal_shapes_into_a_trade_off():
    """Closed cases of the realism rule: the winner's FD above 1.5x the other's -> trade-off."""
    assert claims.realism_verdict("supported", 2.0, 1.5) == "supported"      # 1.33x: a win
    assert claims.realism_verdict("supported", 4.0, 2.0) == "trade-off"      # 2x: shapes less real
    assert claims.realism_verdict("not supported", 1.0, 4.0) == "trade-off"  # B wins on accuracy with 4x FD
    assert claims.realism_verdict("not supported", 4.0, 1.0) == "not supported"
    assert claims.realism_verdict("inconclusive", 9.0, 1.0) == "inconclusive"
    assert claims.realism_verdict("supported", 3.0, 2.0) == "supported"      # exactly 1.5x is not more
    row = claims.claim_row("c", "acc", "a", "b", [0.9, 0.92, 0.91], [0.5, 0.52, 0.51], frechet=([5.0] * 3, [2.0] * 3))
    assert row["verdict"] == "trade-off" and (row["fd_a"], row["fd_b"]) == (5.0, 2.0)
    assert "(FD 5.00)" in claims.claims_markdown([row], "# h")


def test_noise_crossover_closed_cases():
    levels = [0.0, 0.1, 0.2, 0.3, 0.4]
    assert claims.crossover(levels, [0.5, 0.6, 0.7, 0.7, 0.7], [0.7, 0.7, 0.6, 0.5, 0.4]) == pytest.approx(0.1 + 0.1 * 0.1 / 0.2)
    assert claims.crossover(levels, [0.8] * 5, [0.7] * 5) == 0.0  # already above without noise
    assert claims.crossover(levels, [0.5] * 5, [0.7, 0.65, 0.6, 0.55, 0.51]) is None  # never within the levels


def test_noise_report_from_synthetic_runs(tmp_path):
    """write_noise: one table per condition, the crossover computed by the code, and the figure."""
    conds = ("id_cfg", "id_nocfg", "ood_cfg", "ood_nocfg")

    def run(acc):
        return {"final": {f"{c}/{k}": (acc if k == "accuracy" else 2.0) for c in conds for k in ("accuracy", "frechet")}}
    levels = [0.0, 0.2, 0.4]
    per_level = {f"{p:g}": {"runs": {"sft": [run(0.6), run(0.62)], "dpo": [run(0.9 - p), run(0.92 - p)],
                                     "sspo": [run(0.7), run(0.72)]}} for p in levels}
    res = {"levels": levels, "per_level": per_level, "size": {"seeds": 2, "train": {}}, "tuned": {},
           "command": "x", "date": "d", "seconds": 60.0}
    claims.write_noise(res, tmp_path)
    md = (tmp_path / "noise.md").read_text()
    assert "SSPO's mean reaches DPO's at pair_noise = 0.20" in md  # dpo 0.91 - p meets sspo 0.71 at p = 0.2
    assert "| dpo | 0.910 ± 0.014 (FD 2.00) |" in md
    assert (tmp_path / "noise.png").stat().st_size > 1000


def test_seeds_needed_for_an_inconclusive_difference():
    """The smallest n with t(n-1) sd / sqrt(n) < |mean|: a checked closed case, and the row says it."""
    d = [0.1, -0.05, 0.1]  # mean 0.05, sd 0.0866
    n = claims.seeds_needed(d)
    sd = np.std(d, ddof=1)
    assert scipy.stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n) < 0.05 <= scipy.stats.t.ppf(0.975, n - 2) * sd / np.sqrt(n - 1)
    assert claims.seeds_needed([0.1, -0.1, 0.0]) is None  # no effect at all
    row = claims.claim_row("c", "m", "a", "b", [0.6, 0.5, 0.7], [0.5, 0.55, 0.6])
    assert row["verdict"] == "inconclusive" and row["seeds_needed"] == claims.seeds_needed([0.1, -0.05, 0.1])
    assert "seeds would decide it" in claims.claims_markdown([row], "# h")


def test_accuracy_and_fd_stand_together_per_method():
    """The README's summary table: each method's accuracy (mean ± sample sd over seeds) with its FD in the
    same cell, for all four conditions."""
    conds = ("id_cfg", "id_nocfg", "ood_cfg", "ood_nocfg")

    def run(acc, fd):
        return {"final": {f"{c}/{k}": (acc if k == "accuracy" else fd) for c in conds for k in ("accuracy", "frechet")}}
    res = {"runs": {"dpo": [run(0.9, 5.0), run(0.7, 6.0)], "sspo": [run(0.6, 2.5), run(0.6, 2.5)]}}
    md = claims.accuracy_and_fd_markdown(res, "# t")
    assert md.startswith("# t") and md.count("| dpo | 0.80 ± 0.14 (FD 5.5) |") == 1
    assert "| sspo | " + " | ".join(["0.60 ± 0.00 (FD 2.5)"] * 4) + " |" in md
