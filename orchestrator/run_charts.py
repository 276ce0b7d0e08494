"""The run page's charts, drawn as inline SVG on the server: no JavaScript, nothing fetched, readable offline.

- episodes by status over time (stacked: queued, live, succeeded, failed/timed out/cancelled),
- steps per second over the run,
- the reward distribution of finished episodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone
from django.utils.html import escape, format_html
from django.utils.safestring import SafeString, mark_safe

from orchestrator.models import Episode, Run, Step

WIDTH, HEIGHT, PAD = 460, 180, 30
BUCKETS = 40
COLOURS = {"queued": "#c9ced6", "live": "#4a90d9", "succeeded": "#3aa55d", "failed": "#d9534f"}


@dataclass
class Chart:
    title: str
    svg: SafeString


def _frame(title: str, body: str, y_max: float, x_labels: tuple[str, str]) -> SafeString:
    return mark_safe(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" style="font: 11px sans-serif; background: #fff">'
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - 5}" y2="{HEIGHT - PAD}" stroke="#888"/>'
        f'<line x1="{PAD}" y1="5" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#888"/>'
        f'<text x="2" y="14">{y_max:g}</text><text x="2" y="{HEIGHT - PAD}">0</text>'
        f'<text x="{PAD}" y="{HEIGHT - 12}">{escape(x_labels[0])}</text>'
        f'<text x="{WIDTH - 5}" y="{HEIGHT - 12}" text-anchor="end">{escape(x_labels[1])}</text>'
        f"{body}</svg>"
    )


def _x(index: float, count: int) -> float:
    return PAD + (WIDTH - PAD - 5) * index / max(count, 1)


def _y(value: float, y_max: float) -> float:
    return HEIGHT - PAD - (HEIGHT - PAD - 5) * value / (y_max or 1)


def bar_chart(title: str, values: list[float], x_labels: tuple[str, str], colour: str = "#4a90d9") -> Chart:
    y_max = max(values, default=0) or 1
    width = (WIDTH - PAD - 5) / max(len(values), 1)
    bars = "".join(
        f'<rect x="{_x(i, len(values)):.1f}" y="{_y(v, y_max):.1f}" width="{max(width - 1, 1):.1f}" '
        f'height="{HEIGHT - PAD - _y(v, y_max):.1f}" fill="{colour}"><title>{v:g}</title></rect>'
        for i, v in enumerate(values)
    )
    return Chart(title, _frame(title, bars, round(y_max, 2), x_labels))


def stacked_chart(title: str, series: dict[str, list[int]], x_labels: tuple[str, str]) -> Chart:
    count = len(next(iter(series.values())))
    totals = [sum(values[i] for values in series.values()) for i in range(count)]
    y_max = max(totals, default=0) or 1
    below = [0] * count
    shapes = []
    for name, values in series.items():
        top = [below[i] + values[i] for i in range(count)]
        upper = " ".join(f"{_x(i, count - 1):.1f},{_y(top[i], y_max):.1f}" for i in range(count))
        lower = " ".join(f"{_x(i, count - 1):.1f},{_y(below[i], y_max):.1f}" for i in reversed(range(count)))
        shapes.append(f'<polygon points="{upper} {lower}" fill="{COLOURS[name]}"><title>{name}</title></polygon>')
        below = top
    legend = "".join(
        f'<rect x="{PAD + 8 + 80 * i}" y="8" width="10" height="10" fill="{COLOURS[name]}"/>'
        f'<text x="{PAD + 22 + 80 * i}" y="17">{name}</text>'
        for i, name in enumerate(series)
    )
    return Chart(title, _frame(title, "".join(shapes) + legend, y_max, x_labels))


def _times(start: datetime, end: datetime) -> list[datetime]:
    return [start + (end - start) * i / (BUCKETS - 1) for i in range(BUCKETS)]


def run_charts(run: Run) -> list[Chart]:
    if not run.started_at:
        return []
    start, end = run.started_at, run.finished_at or timezone.now()
    span = f"{(end - start).total_seconds():.0f} s"
    episodes = list(run.episodes.values_list("status", "started_at", "finished_at"))
    series = {name: [] for name in COLOURS}
    for t in _times(start, end):
        counts = dict.fromkeys(COLOURS, 0)
        for status, started, finished in episodes:
            if finished and finished <= t:
                counts["succeeded" if status == Episode.Status.SUCCEEDED else "failed"] += 1
            elif started and started <= t:
                counts["live"] += 1
            else:
                counts["queued"] += 1
        for name, value in counts.items():
            series[name].append(value)
    charts = [stacked_chart("Episodes by status over time", series, ("start", span))]

    seconds = max((end - start).total_seconds(), 1e-6)
    width = seconds / BUCKETS
    steps = [0.0] * BUCKETS
    for completed in Step.objects.filter(episode__run=run, completed_at__isnull=False).values_list(
        "completed_at", flat=True
    ):
        index = min(BUCKETS - 1, max(0, int((completed - start).total_seconds() / width)))
        steps[index] += 1 / width
    charts.append(bar_chart("Steps per second", [round(rate, 2) for rate in steps], ("start", span)))

    rewards = [reward for reward in run.episodes.exclude(reward=None).values_list("reward", flat=True)]
    bins = [0] * 11
    for reward in rewards:
        bins[min(10, max(0, round(reward * 10)))] += 1
    charts.append(bar_chart(f"Reward distribution ({len(rewards)} episodes)", bins, ("0.0", "1.0"), "#3aa55d"))
    return charts


def render(charts: list[Chart]) -> SafeString:
    figures = "".join(
        format_html(
            '<figure style="display:inline-block;margin:0 16px 16px 0"><figcaption>{}</figcaption>{}</figure>',
            chart.title,
            chart.svg,
        )  # fmt: skip
        for chart in charts
    )
    return mark_safe(figures)
