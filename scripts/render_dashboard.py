"""Render the Grafana dashboard's queries from a live Prometheus into one PNG (no Grafana needed).

Each dashboard panel becomes a small time-series plot titled like the panel, one line per series,
labelled with the panel's legendFormat. Grafana template variables are replaced by fixed values.

    python scripts/render_dashboard.py --prometheus http://localhost:9090 --minutes 30 --out docs/dashboard.png

tests/integration/test_prometheus.py calls `render_dashboard` (with RENDER_DASHBOARD=1) against the
Prometheus it starts, which is how docs/dashboard.png is produced.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "anomaly-worker.json"

# Grafana variables -> values for a plain Prometheus query. Longest names first, so `$__rate_interval`
# is not mistaken for a variable `$__rate`.
DEFAULT_VARIABLES: dict[str, str] = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$instance": ".*",
    "$job": ".*",
}


MAX_LEGEND = 8


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace Grafana variables (`$name` and `${name}`) in a PromQL expression."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name[1:] + "}", variables[name]).replace(name, variables[name])
    return expr


def panels(dashboard: Mapping[str, Any], variables: Mapping[str, str] = DEFAULT_VARIABLES) -> list[Panel]:
    """Panels with Prometheus queries, in dashboard order (rows flattened, row headers skipped)."""

    def walk(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            if item.get("type") == "row":
                yield from walk(item.get("panels", []))  # collapsed rows carry their panels
            else:
                yield item

    found = []
    for panel in walk(list(dashboard.get("panels", []))):
        queries = tuple(
            Query(substitute(t["expr"], variables), t.get("legendFormat", ""))
            for t in panel.get("targets", [])
            if t.get("expr") and not t.get("hide")
        )
        if queries:
            found.append(Panel(panel.get("title", ""), queries))
    return found


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def prometheus_get(base_url: str, path: str, params: Mapping[str, Any], timeout: float = 30.0) -> Any:
    """GET a Prometheus HTTP API endpoint; return `data`, or raise with Prometheus' error message."""
    url = f"{base_url.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"Prometheus URL must be http(s), got {base_url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - scheme checked above
            body = json.load(response)
    except urllib.error.HTTPError as exc:  # 400/422 carry a JSON error body
        body = json.load(exc)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus {path} failed for {dict(params)}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def legend(template: str, labels: Mapping[str, str]) -> str:
    """Grafana legendFormat: `{{label}}` replaced by the series' label value."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    return text or "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items() if k != "__name__") + "}"


def render_dashboard(prometheus_url: str, start: float, end: float, out: Path, step: float | None = None,
                     variables: Mapping[str, str] = DEFAULT_VARIABLES, dashboard_path: Path = DASHBOARD,
                     columns: int = 3) -> Path:
    """Query every panel over [start, end] (Unix seconds) and save a grid of plots to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if end <= start:
        raise ValueError(f"end must be after start, got start={start} end={end}")
    dashboard = load_dashboard(dashboard_path)
    found = panels(dashboard, variables)
    step = step or max(1.0, (end - start) / 300)
    rows = math.ceil(len(found) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 2.9 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, found, strict=False):
        lines = []
        for query in panel.queries:
            data = prometheus_get(prometheus_url, "/api/v1/query_range",
                                  {"query": query.expr, "start": start, "end": end, "step": step})
            for series in data["result"]:
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                lines.append((legend(query.legend, series["metric"])[:40], xs, ys))
        # Many series (one per schema field): name only the MAX_LEGEND largest, draw the rest unnamed.
        peak = sorted(lines, key=lambda line: max((y for y in line[2] if math.isfinite(y)), default=0.0),
                      reverse=True)
        named = {id(line) for line in peak[:MAX_LEGEND]}
        for line in lines:
            label, xs, ys = line
            ax.plot(xs, ys, linewidth=1.2, label=label if id(line) in named else "_nolegend_")
        ax.set_title(panel.title, fontsize=10)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("seconds", fontsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(found):]:
        ax.axis("off")
    fig.suptitle(f"{dashboard.get('title', 'dashboard')} — {time.strftime('%Y-%m-%d %H:%M', time.gmtime(end))} UTC",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", default="http://localhost:9090", help="Prometheus base URL")
    p.add_argument("--minutes", type=float, default=30.0, help="time range ending now")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    p.add_argument("--job", default=".*", help="value of the dashboard's $job variable (regex)")
    args = p.parse_args(argv)
    end = time.time()
    variables = {**DEFAULT_VARIABLES, "$job": args.job}
    print(render_dashboard(args.prometheus, end - args.minutes * 60, end, args.out, variables=variables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
