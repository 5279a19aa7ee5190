"""eval.robustness_summary: worst, area and window of a learning-rate sweep, against values computed by hand.
The scores are dyadic fractions (k / 2^n), so every sum and mean is exact in floating point and the checks
use ==, not a tolerance."""
from __future__ import annotations

import math

import pytest

from eval import robustness_summary as RS
from eval import robustness_tables as RT
from eval.common import run_main
from eval.tables import measured, percent


def test_one_method_by_hand():
    # factors 1 2 4 8 -> x = 0 1 2 3; best 0.75 at 2x with std 0.125, so the tolerance is one std (> 1 point)
    points = [(8.0, 0.25, 0.0), (1.0, 0.5, 0.0), (4.0, 0.625, 0.0), (2.0, 0.75, 0.125)]   # any order
    s = RS.curve_summary(points)
    assert (s["best"], s["best_factor"], s["worst"], s["worst_factor"]) == (0.75, 2.0, 0.25, 8.0)
    # trapezoids: (0.5 + 0.75)/2 + (0.75 + 0.625)/2 + (0.625 + 0.25)/2 = 0.625 + 0.6875 + 0.4375 = 1.75;
    # / (best 0.75 x span 3) = 1.75 / 2.25 = 7/9
    assert s["area"] == 7 / 9
    # within 0.125 of 0.75: 0.625 (4x) yes, 0.5 (1x) no -> 2x..4x, one doubling
    assert (s["tolerance"], s["tolerance_from"]) == (0.125, "1 std")
    assert (s["window_low"], s["window_high"], s["window"]) == (2.0, 4.0, 1.0)


def test_one_point_when_the_seeds_agree_and_the_window_is_contiguous():
    # std 0 at the best: tolerance one point (0.01). 8x is as close as 4x, but 2x between them is not: the window
    # is the adjacent run around the best, 4x alone
    points = [(1.0, 0.5, 0.0), (2.0, 0.5, 0.0), (4.0, 0.75, 0.0), (8.0, 0.75 - 2 ** -7, 0.25)]
    s = RS.curve_summary(points)
    assert (s["tolerance"], s["tolerance_from"]) == (0.01, "1 point")
    assert (s["window_low"], s["window_high"], s["window"]) == (4.0, 8.0, 1.0)   # 2^-7 < 0.01: 8x is near
    s = RS.curve_summary(points, point=2 ** -8)                                   # 2^-7 > 2^-8: not any more
    assert (s["window_low"], s["window_high"], s["window"]) == (4.0, 4.0, 0.0)
    # a flat sweep: area exactly 1, the window every factor: log2(8 / 1) = 3 doublings
    flat = RS.curve_summary([(f, 0.5, 0.0) for f in (1.0, 2.0, 4.0, 8.0)])
    assert (flat["area"], flat["window"], flat["best_factor"], flat["worst_factor"]) == (1.0, 3.0, 1.0, 1.0)


def test_uneven_factors_ties_and_one_factor():
    # factors 1 4 16 -> x = 0 2 4: trapezoids 2·(0.5 + 1)/2 + 2·(1 + 0.5)/2 = 3; / (1 x 4) = 0.75
    s = RS.curve_summary([(1.0, 0.5, 0.0), (4.0, 1.0, 0.0), (16.0, 0.5, 0.0)])
    assert (s["area"], s["worst"], s["worst_factor"]) == (0.75, 0.5, 1.0)   # equal worsts: the lowest factor
    tie = RS.curve_summary([(1.0, 0.75, 0.0), (2.0, 0.5, 0.0), (4.0, 0.75, 0.5)])
    assert (tie["best_factor"], tie["best_std"], tie["tolerance"]) == (1.0, 0.0, 0.01)   # equal bests: the lowest
    one = RS.curve_summary([(2.0, 0.5, 0.0)])
    assert (one["area"], one["window"], one["best"], one["worst"]) == (None, 0.0, 0.5, 0.5)
    assert RS.curve_summary([(1.0, 0.0, 0.0), (2.0, 0.0, 0.0)])["area"] is None   # no best to normalise by
    with pytest.raises(ValueError):
        RS.curve_summary([])


def test_lower_is_better_for_a_drift_or_a_loss():
    points = [(1.0, 0.25, 0.0), (2.0, 0.25 + 2 ** -8, 0.0), (4.0, 0.5, 0.0)]
    s = RS.curve_summary(points, higher_is_better=False)
    assert (s["best"], s["best_factor"], s["worst"], s["worst_factor"]) == (0.25, 1.0, 0.5, 4.0)
    assert (s["window_low"], s["window_high"]) == (1.0, 2.0)
    # trapezoids (0.25 + 0.25390625)/2 + (0.25390625 + 0.5)/2 = 0.251953125 + 0.376953125 = 0.62890625;
    # / (0.25 x 2) = 1.2578125: above 1, the area a lower-is-better curve loses
    assert s["area"] == 1.2578125


def test_seeds_are_averaged_from_one_row_per_run():
    """Rows as results.csv holds them (strings; failed runs, other studies and the per-epoch rows of the
    prolonged runs left out); the score column is a parameter."""
    rows = [{"study": "lr", "method": "lora", "factor": "1.0", "status": "trained", "epoch": "", "acc": a}
            for a in ("0.5", "0.625", "0.75")]
    rows += [{"study": "lr", "method": "lora", "factor": "2.0", "status": "trained", "epoch": "", "acc": "0.25"},
             {"study": "lr", "method": "lora", "factor": "2.0", "status": "failed", "epoch": "", "acc": ""},
             {"study": "lr", "method": "lora", "factor": "4.0", "status": "trained", "epoch": "", "acc": ""},
             {"study": "long", "method": "lora", "factor": "1.0", "status": "trained", "epoch": "", "acc": "0.0"},
             {"study": "lr", "method": "lora", "factor": "1.0", "status": "trained", "epoch": "1", "acc": "0.0"},
             {"study": "lr", "method": "dora", "factor": "1.0", "status": "trained", "epoch": "", "acc": "0.5"},
             {"study": "lr", "method": "dora", "factor": "2.0", "status": "trained", "epoch": "", "acc": "0.5"}]
    # lora 1x: mean 0.625, sample std sqrt((0.125² + 0 + 0.125²) / 2) = 0.125; 2x: one seed, std 0
    assert RS.sweep_values(rows, "acc") == {"lora": {1.0: [0.5, 0.625, 0.75], 2.0: [0.25]},
                                            "dora": {1.0: [0.5], 2.0: [0.5]}}
    assert RS.points_of({1.0: [0.5, 0.625, 0.75], 2.0: [0.25]}) == [(1.0, 0.625, 0.125), (2.0, 0.25, 0.0)]
    lora, dora = RS.summarise(rows, "acc")
    assert (lora["method"], lora["score"], lora["seeds"], lora["best"], lora["worst"]) == ("lora", "acc", 1, 0.625,
                                                                                          0.25)
    assert (lora["tolerance"], lora["tolerance_from"], lora["window"]) == (0.125, "1 std", 0.0)
    assert lora["area"] == ((0.625 + 0.25) / 2) / 0.625 == 0.7
    assert (dora["area"], dora["window"], dora["seeds"]) == (1.0, 1.0, 1)
    assert RS.summarise(rows, "drift") == []           # a column no row has: nothing to summarise


def test_the_table_reads_at_a_glance():
    s = RS.curve_summary([(1.0, 0.5, 0.0), (2.0, 0.75, 0.125), (4.0, 0.625, 0.0), (8.0, 0.25, 0.0)])
    table = RS.summary_table([{"method": "lora", **s}])
    assert table.splitlines()[2] == "| lora | 75.0 (2×) | 25.0 (8×) | 0.778 | 1 (2×–4×) | 12.5 (1 std) |"
    assert table.splitlines()[0].startswith("| method | best (factor) | worst (factor) |")


def test_numbers_at_one_precision():
    assert percent(0.8444, 0.02219) == "84.4 ± 2.2" and percent(0.7011) == "70.1" and percent(None) == ""
    assert percent(0.0, 0.0) == "0.0 ± 0.0" and percent("0.5", "") == "50.0"
    assert measured(2.441, 0.4355) == "2.44 ± 0.44" and measured(58.23, 8.686) == "58.2 ± 8.7"
    assert measured(0.01234, 0.0011) == "0.0123 ± 0.0011" and measured(1234.5) == "1234" and measured(0.0) == "0.00"
    assert measured(math.nan) == "" and measured("") == ""


def test_the_tables_go_where_the_report_had_them():
    """eval.robustness_tables.replace_sections: the title names the task, the owned sections are replaced where
    they were, and a report that had none gets them before the weight norms; other sections stay."""
    report = ("# Robustness study: glue\n\nheader\n\n## Learning-rate sweep (Fig. 2)\n\nold table\n\n"
              "## Weight norms (Fig. 4)\n\nnorms\n\n## Commands\n\ncmd\n")
    new = RT.replace_sections(report, "# Robustness study: glue (tweets)", ["## Learning-rate sweep (Fig. 2)", "",
                                                                          "| new |\n"], RT.OWNED)
    assert new == ("# Robustness study: glue (tweets)\n\nheader\n\n## Learning-rate sweep (Fig. 2)\n\n| new |\n\n"
                   "## Weight norms (Fig. 4)\n\nnorms\n\n## Commands\n\ncmd\n")
    bare = "# t\n\nheader\n\n## Weight norms (Fig. 4)\n\nnorms\n"
    assert RT.replace_sections(bare, "# t2", ["## App. D (Fig. 6)", "", "| d |\n"], RT.OWNED) == (
        "# t2\n\nheader\n\n## App. D (Fig. 6)\n\n| d |\n\n## Weight norms (Fig. 4)\n\nnorms\n")


def test_bad_input_is_one_error_line(tmp_path, capsys):

    study = tmp_path / "study"
    study.mkdir()
    cases = [(tmp_path / "nope", "is not a folder"), (study, "has no report.md")]
    for folder, said in cases:
        assert run_main(RT.main, [str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and said in err[0], err
    (study / "report.md").write_text("# Robustness study\n")
    for text, said in (("study,method\nlr,lora\n", "no column factor, status"),
                       ("study,method,factor,status\nlr,lora,one,trained\n", "not a robustness study's CSV")):
        (study / "results.csv").write_text(text)
        (study / "summary.csv").write_text(text)
        assert run_main(RT.main, [str(study)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and said in err[0], err
    assert (study / "report.md").read_text() == "# Robustness study\n"     # nothing written
