"""How flat a method's score-vs-learning-rate curve is: three numbers per method from a learning-rate sweep
(eval.robustness's Fig. 2 study). "Learning Rate Matters" (arXiv 2602.04998) finds that tuned LoRA variants
land within 1-2 % of each other and argues that a flat curve, not the peak, is what separates them.

For one method the sweep gives points (f_i, s_i, σ_i): learning-rate factor, mean score over the seeds and the
sample std over the seeds, sorted by factor; x_i = log2 f_i. best = max s_i (of equal means, the lowest factor),
σ_best its std.

  worst     min s_i, and its factor.
  area      trapezoid area under s(x) over the swept x, divided by best × (x_last − x_first): the mean score over
            the swept log2 span as a fraction of the best. 1 = flat at the best; 0.9 = on average 10 % below it.
            None with one factor (no span) or a best ≤ 0.
  window    tolerance t = max(one point, σ_best), where one point is 0.01 of a 0-1 score (one percentage point of
            accuracy, 0.01 of DINO); `tolerance_from` says which one was larger ("1 point" or "1 std"). The window
            is the run of adjacent swept factors around the best one whose means are all ≥ best − t; its width is
            log2(f_high / f_low), the number of doublings it spans (0: only the best factor is that close).
            Measured on the swept grid: nothing is assumed between two swept factors.

Scores where lower is better (a drift, a validation loss) pass higher_is_better=False: best = min s_i,
worst = max s_i, the window holds s_i ≤ best + t, and area is still trapezoid / (best × span) (then ≥ 1; 1 = flat).
Any score column summarises the same way: the functions take its name.

Pure functions of numbers (no files, no torch): tests/test_robustness_summary.py checks them on hand-computed
values.
"""
from __future__ import annotations

import math
import statistics

from .tables import md_table, percent

POINT = 0.01             # one point of a 0-1 score
Point = tuple[float, float, float]   # (factor, mean, std over seeds)


def _num(value) -> float | None:
    if value is None or value == "":
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def area(points: list[Point], best: float) -> float | None:
    """∫ s d(log2 f) by trapezoids over the swept factors, / (best × the swept log2 span)."""
    xs = [math.log2(f) for f, _, _ in points]
    span = xs[-1] - xs[0]
    if len(points) < 2 or span <= 0 or best <= 0:
        return None
    total = sum((xs[i + 1] - xs[i]) * (points[i][1] + points[i + 1][1]) / 2 for i in range(len(points) - 1))
    return total / (best * span)


def curve_summary(points: list[Point], point: float = POINT, higher_is_better: bool = True) -> dict:
    """worst, area and window (module docstring) of one method's sweep; points in any order, factors > 0."""
    points = sorted(points)
    if not points:
        raise ValueError("no points: a summary needs at least one swept factor")
    sign = 1 if higher_is_better else -1
    b = max(range(len(points)), key=lambda i: (sign * points[i][1], -points[i][0]))
    w = min(range(len(points)), key=lambda i: (sign * points[i][1], points[i][0]))
    best, best_std = points[b][1], points[b][2] or 0.0
    tolerance = max(point, best_std)
    near = [sign * (best - s) <= tolerance for _, s, _ in points]
    low = high = b
    while low > 0 and near[low - 1]:
        low -= 1
    while high < len(points) - 1 and near[high + 1]:
        high += 1
    return {"best": best, "best_factor": points[b][0], "best_std": best_std,
            "worst": points[w][1], "worst_factor": points[w][0], "area": area(points, best),
            "tolerance": tolerance, "tolerance_from": "1 point" if point >= best_std else "1 std",
            "window_low": points[low][0], "window_high": points[high][0],
            "window": math.log2(points[high][0] / points[low][0]), "factors": len(points)}


def sweep_values(rows: list[dict], score: str) -> dict[str, dict[float, list[float]]]:
    """method -> factor -> `score` of each seed, from one row per run (results.csv's rows or the report's):
    sweep rows (study 'lr') that did not fail and have the score; the prolonged runs' per-epoch rows are not
    sweep rows."""
    values: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        value = _num(r.get(score))
        if (r.get("study") != "lr" or r.get("status") == "failed" or r.get("epoch") not in (None, "")
                or value is None):
            continue
        values.setdefault(r["method"], {}).setdefault(float(r["factor"]), []).append(value)
    return values


def points_of(by_factor: dict[float, list[float]]) -> list[Point]:
    """(factor, mean, sample std) per factor; a factor with one seed has std 0."""
    return [(f, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for f, v in sorted(by_factor.items())]


def summarise(rows: list[dict], score: str, point: float = POINT, higher_is_better: bool = True) -> list[dict]:
    """One summary per method (in the order the rows name them) of `score`'s sweep: curve_summary's keys plus
    method, score and seeds (the fewest seeds behind any of its points)."""
    return [{"method": m, "score": score, "seeds": min(len(v) for v in by.values()),
             **curve_summary(points_of(by), point, higher_is_better)}
            for m, by in sweep_values(rows, score).items()]


def _factor(f: float) -> str:
    return f"{f:g}×"


def cells(s: dict) -> dict[str, str]:
    """A summary's table cells: scores as percent with one decimal, area to three decimals."""
    low, high = s["window_low"], s["window_high"]
    window = _factor(low) + ("" if low == high else f"–{_factor(high)}")
    return {"method": s["method"], "best": f"{percent(s['best'])} ({_factor(s['best_factor'])})",
            "worst": f"{percent(s['worst'])} ({_factor(s['worst_factor'])})",
            "area": "" if s["area"] is None else f"{s['area']:.3f}",
            "window": f"{s['window']:g} ({window})", "tolerance": f"{percent(s['tolerance'])} ({s['tolerance_from']})"}


COLUMNS = [("method", "method"), ("best (factor)", "best"), ("worst (factor)", "worst"),
           ("area / (best × span)", "area"), ("window: doublings (factors)", "window"), ("tolerance", "tolerance")]


def summary_table(summaries: list[dict]) -> str:
    """The Markdown table of summarise()'s output (scores in percent)."""
    return md_table([cells(s) for s in summaries], COLUMNS, lambda row, key: row[key])


CSV_COLUMNS = ["method", "score", "seeds", "factors", "best", "best_factor", "best_std", "worst", "worst_factor",
               "area", "window", "window_low", "window_high", "tolerance", "tolerance_from"]
