"""Line plots drawn with PIL: one line per run against the step, with ticks, grid, axis labels and a legend.

The Compare and Train tabs redraw two of these per click or poll; matplotlib took ~60-120 ms a figure
(text layout of every tick, a second draw for the layout), most of a Compare click under load. Here the
plot is drawn at twice its size and halved with a box filter (anti-aliased lines and text) in a few ms.

    line_plot(series, title, xlabel, ylabel)  -> PIL.Image   series: [(label, [x], [y], "#rrggbb")]
    nice_ticks(lo, hi, n)                     -> [tick values], 1-2-5 steps covering [lo, hi]
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw, ImageFont

SS = 2                                    # supersampling factor
GRID, AXIS, MUTED = "#e6e6e6", "#333333", "#888888"


@functools.lru_cache(maxsize=8)
def _font(size: int):
    """matplotlib's DejaVu Sans (it has ‖ and ₀, which Pillow's default font lacks): the same look."""
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """Ticks at multiples of a 1, 2 or 5 × 10^k step, about n of them, inside [lo, hi]."""
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(v: float, step: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"


def _span(values: list[float], pad: float) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        d = abs(lo) * 0.05 or 1.0
        return lo - d, hi + d
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def line_plot(series: list[tuple[str, list[float], list[float], str]], title: str, xlabel: str, ylabel: str,
              size: tuple[int, int] = (640, 320), empty: str = "no data yet") -> Image.Image:
    W, H = size[0] * SS, size[1] * SS
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    small, font, big = _font(10 * SS), _font(11 * SS), _font(13 * SS)
    x0, y0, x1, y1 = 72 * SS, 28 * SS, W - 14 * SS, H - 42 * SS           # the axes box
    d.text(((x0 + x1) // 2, 6 * SS), title, font=big, fill="black", anchor="ma")
    d.text(((x0 + x1) // 2, H - 4 * SS), xlabel, font=font, fill="black", anchor="md")
    ylab = Image.new("RGB", (y1 - y0, 16 * SS), "white")
    ImageDraw.Draw(ylab).text((ylab.width // 2, 0), ylabel, font=font, fill="black", anchor="ma")
    img.paste(ylab.rotate(90, expand=True), (4 * SS, y0))
    series = [s for s in series if len(s[1])]
    if not series:
        d.rectangle([x0, y0, x1, y1], outline=AXIS, width=SS)
        d.text(((x0 + x1) // 2, (y0 + y1) // 2), empty, font=big, fill=MUTED, anchor="mm")
        return img.reduce(SS)
    xlo, xhi = _span([x for s in series for x in s[1]], 0.03)
    ylo, yhi = _span([y for s in series for y in s[2]], 0.05)

    def px(x):
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def py(y):
        return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for ticks, horizontal in ((nice_ticks(xlo, xhi, 6, integer=True), False), (nice_ticks(ylo, yhi, 6), True)):
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        for t in ticks:
            if horizontal:
                d.line([(x0, py(t)), (x1, py(t))], fill=GRID, width=SS)
                d.text((x0 - 5 * SS, py(t)), _label(t, step), font=small, fill=AXIS, anchor="rm")
            else:
                d.line([(px(t), y0), (px(t), y1)], fill=GRID, width=SS)
                d.text((px(t), y1 + 5 * SS), _label(t, step), font=small, fill=AXIS, anchor="ma")
    d.rectangle([x0, y0, x1, y1], outline=AXIS, width=SS)
    points = []
    for _, xs, ys, colour in series:
        pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
        points += pts
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2 * SS, joint="curve")
        if len(pts) < 30:
            r = 3 * SS
            for x, y in pts:
                d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    _legend(d, series, points, (x0, y0, x1, y1), small)
    return img.reduce(SS)


def _legend(d: ImageDraw.ImageDraw, series, points, box, font) -> None:
    """The legend in the corner of the axes that covers the fewest data points (matplotlib's 'best')."""
    x0, y0, x1, y1 = box
    labels = [s[0] if len(s[0]) <= 60 else s[0][:57] + "..." for s in series]
    line_h, swatch, pad = 13 * SS, 18 * SS, 5 * SS
    w = swatch + 3 * pad + max(d.textlength(t, font=font) for t in labels)
    h = line_h * len(labels) + 2 * pad
    corners = [(x1 - pad - w, y0 + pad), (x0 + pad, y0 + pad), (x1 - pad - w, y1 - pad - h), (x0 + pad, y1 - pad - h)]
    lx, ly = min(corners, key=lambda c: sum(c[0] <= x <= c[0] + w and c[1] <= y <= c[1] + h for x, y in points))
    d.rounded_rectangle([lx, ly, lx + w, ly + h], radius=3 * SS, fill="white", outline="#cccccc", width=SS)
    for i, ((_, _, _, colour), text) in enumerate(zip(series, labels)):
        y = ly + pad + i * line_h + line_h // 2
        d.line([(lx + pad, y), (lx + pad + swatch, y)], fill=colour, width=2 * SS)
        d.text((lx + 2 * pad + swatch, y), text, font=font, fill="black", anchor="lm")
