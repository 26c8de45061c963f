"""The loss curve as a picture (TrainLoRA's IMAGE output and its preview): raw loss, its moving average, and
the learning rate on a second axis. Pillow only."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

RAW, SMOOTH, LR = (170, 200, 235), (20, 70, 160), (215, 120, 40)


def smoothed(values: Sequence[float], beta: float = 0.95) -> list[float]:
    """A debiased exponential moving average (TensorBoard's smoothing), one value per input."""
    average, result = 0.0, []
    for i, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        result.append(average / (1 - beta**i))
    return result


def loss_chart(
    losses: Sequence[float], lrs: Sequence[float], total: int, title: str = "", width: int = 768, height: int = 320
) -> Image.Image:
    chart = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(chart)
    x0, y0, x1, y1 = 60, 30, width - 70, height - 30
    draw.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
    steps = len(losses)
    last = f"step {steps}/{total}" + (f", loss {losses[-1]:.4g} (smoothed {smoothed(losses)[-1]:.4g})" if steps else "")
    draw.text((x0, 8), f"{title}  {last}".strip(), fill="black")
    draw.text((x0, y1 + 8), "raw loss", fill=RAW)
    draw.text((x0 + 70, y1 + 8), "smoothed", fill=SMOOTH)
    draw.text((x0 + 140, y1 + 8), "learning rate (right axis)", fill=LR)
    if steps < 2:
        return chart
    span = max(total, steps)

    def xs(n: int) -> list[float]:
        return [x0 + (x1 - x0) * (i + 1) / span for i in range(n)]

    ordered = sorted(losses)
    top = ordered[min(len(ordered) - 1, int(0.98 * len(ordered)))] * 1.05 or 1.0
    bottom = min(0.0, ordered[0])

    def ys(values: Sequence[float], low: float, high: float) -> list[float]:
        return [y1 - (y1 - y0) * (min(max(v, low), high) - low) / ((high - low) or 1.0) for v in values]

    draw.line(list(zip(xs(steps), ys(losses, bottom, top), strict=True)), fill=RAW, width=1)
    draw.line(list(zip(xs(steps), ys(smoothed(losses), bottom, top), strict=True)), fill=SMOOTH, width=2)
    draw.text((5, y0), f"{top:.3g}", fill="black")
    draw.text((5, y1 - 10), f"{bottom:.3g}", fill="black")
    if lrs:
        peak = max(lrs) or 1.0
        draw.line(list(zip(xs(len(lrs)), ys(lrs, 0.0, peak * 1.05), strict=True)), fill=LR, width=1)
        draw.text((x1 + 5, y0), f"{peak:.2g}", fill=LR)
        draw.text((x1 + 5, y1 - 10), "0", fill=LR)
    return chart
