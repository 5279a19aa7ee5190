"""How the reports write numbers in their Markdown tables, so that a table reads at a glance (the CSV files keep
every digit):

    percent(0.8444, 0.0222)      '84.4 ± 2.2'       a 0-1 score (accuracy, F1, DINO/CLIP cosine, mIoU) as
                                                    percent, one decimal, its ± at the same precision
    measured(2.441, 0.4355)      '2.44 ± 0.44'      any other measurement (a distance, a bound): three significant
                                                    digits of the mean, its ± to the same decimal place
    md_table(rows, columns, cell)                   a Markdown table, one row per dict
    write_csv(path, columns, rows)                  a CSV file, written atomically ('' for None)
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path

from ground.runfolder import write_text

PERCENT_DECIMALS = 1
SIGNIFICANT = 3


def _number(value) -> float | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _with_std(mean: float, std, decimals: int) -> str:
    std = _number(std)
    text = f"{mean:.{decimals}f}"
    return text if std is None else f"{text} ± {std:.{decimals}f}"


def percent(mean, std=None) -> str:
    """A 0-1 score as percent with one decimal ('84.4'), with its std at the same precision ('84.4 ± 2.2');
    '' when there is no number."""
    mean = _number(mean)
    if mean is None:
        return ""
    std = _number(std)
    return _with_std(100 * mean, None if std is None else 100 * std, PERCENT_DECIMALS)


def decimals_for(value: float, significant: int = SIGNIFICANT) -> int:
    """Decimal places that show `significant` digits of `value` (2.441 -> 2, 58.23 -> 1, 0.01234 -> 4,
    1234 -> 0)."""
    if value == 0:
        return significant - 1
    return max(0, significant - 1 - math.floor(math.log10(abs(value))))


def measured(mean, std=None) -> str:
    """Three significant digits of the mean, the std to the same decimal place: '2.44 ± 0.44', '58.2 ± 8.7'."""
    mean = _number(mean)
    if mean is None:
        return ""
    return _with_std(mean, std, decimals_for(mean))


def md_table(rows: list[dict], columns: list[tuple[str, str]], cell: Callable[[dict, str], str]) -> str:
    """columns: (title, key); cell(row, key) -> the text of one cell."""
    head = "| " + " | ".join(t for t, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(cell(r, k) for _, k in columns) + " |\n" for r in rows)


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in columns} for r in rows)
    write_text(path, buf.getvalue())
