#!/usr/bin/env python3
"""Tables and plots of scripts/compare-durable.sh's runs (standard library only).

usage: summarize-durable.py RUNS.jsonl PLOT_DIR

Prints markdown tables (medians over rounds) of flows per second, p50 and p99 of a flow, and
server CPU per flow for the coordinator, hand-rolled PostgreSQL and Redis, with the
coordinator's ratios to PostgreSQL, per layout; then the replay, lookup and health rows. Writes
PLOT_DIR/durable-LAYOUT.svg: throughput, p50 and p99 against flows in flight.
"""

import json
import os
import statistics
import sys
from collections import defaultdict

TARGETS = [("coordinator", "#1f77b4"), ("postgres", "#d62728"), ("redis", "#2ca02c")]


def load(path):
    runs = defaultdict(list)
    with open(path) as lines:
        for line in lines:
            r = json.loads(line)
            op = r["ops"].get("flow") or next(iter(r["ops"].values()))
            errors = sum(sum(o["errors"].values()) for o in r["ops"].values())
            runs[(r["layout"], r["name"], r["concurrency"])].append(
                {
                    "rate": r["rate_per_s"],
                    "p50": op["p50_ms"],
                    "p99": op["p99_ms"],
                    "cpu": r["server_cpu_ms_per_unit"] or 0.0,
                    "errors": errors,
                }
            )
    return runs


def median(values):
    return statistics.median(values) if values else float("nan")


def summary(runs):
    table = {}
    for key, samples in runs.items():
        table[key] = {field: median([s[field] for s in samples]) for field in ("rate", "p50", "p99", "cpu")}
        table[key]["errors"] = sum(s["errors"] for s in samples)
        table[key]["n"] = len(samples)
        table[key]["range"] = (min(s["rate"] for s in samples), max(s["rate"] for s in samples))
    return table


def print_tables(table):
    layouts = sorted({layout for layout, _, _ in table}, key=lambda l: (l != "pinned", l))
    for layout in layouts:
        concurrencies = sorted({c for (l, name, c) in table if l == layout and name == "coordinator"})
        if not concurrencies:
            continue
        print(f"\n### {layout}\n")
        print(
            "| in flight | coordinator flows/s | PostgreSQL flows/s | Redis flows/s | coordinator / PG "
            "| p50 ms (coord / PG / Redis) | p99 ms (coord / PG / Redis) "
            "| server CPU ms per flow (coord / PG / Redis) | CPU coord / PG |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for c in concurrencies:
            row = {name: table.get((layout, name, c)) for name, _ in TARGETS}
            co, pg, rd = row["coordinator"], row["postgres"], row["redis"]

            def rate(r):
                if r is None:
                    return "–"
                low, high = r["range"]
                return f"{r['rate']:,.0f} ({low:,.0f}–{high:,.0f})"

            def three(field, fmt):
                return " / ".join(fmt.format(r[field]) if r else "–" for r in (co, pg, rd))

            ratio = f"{co['rate'] / pg['rate']:.2f}×" if co and pg else "–"
            cpu_ratio = f"{co['cpu'] / pg['cpu']:.2f}×" if co and pg and pg["cpu"] else "–"
            print(
                f"| {c} | {rate(co)} | {rate(pg)} | {rate(rd)} | {ratio} | {three('p50', '{:.2f}')} "
                f"| {three('p99', '{:.2f}')} | {three('cpu', '{:.3f}')} | {cpu_ratio} |"
            )
        errors = sum(r["errors"] for (l, _, _), r in table.items() if l == layout)
        print(f"\nErrors in all {layout} runs: {errors}.")
    calls = sorted((key, r) for key, r in table.items() if key[1].startswith("coordinator-"))
    if calls:
        print("\n### replay, lookup and health (pinned)\n")
        print("| call | in flight | calls/s | p50 ms | p99 ms | server CPU µs per call | CPU / health's |")
        print("|---|---|---|---|---|---|---|")
        for (layout, name, c), r in calls:
            health = table.get((layout, "coordinator-health", c))
            ratio = f"{r['cpu'] / health['cpu']:.2f}×" if health and health["cpu"] else "–"
            print(
                f"| {name.removeprefix('coordinator-')} | {c} | {r['rate']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} "
                f"| {r['cpu'] * 1000:.1f} | {ratio} |"
            )


def svg_chart(x0, y0, width, height, title, series, concurrencies, unit, log_y=False):
    """One line chart; series: [(name, colour, [value per concurrency])]."""
    import math

    values = [v for _, _, vs in series for v in vs if v == v and v > 0]
    if not values:
        return ""
    top = max(values) * 1.1
    bottom = min(values) / 1.5 if log_y else 0.0

    def y_of(v):
        if log_y:
            return y0 + height - (math.log(v) - math.log(bottom)) / (math.log(top) - math.log(bottom)) * height
        return y0 + height - (v - bottom) / (top - bottom) * height

    def x_of(i):
        return x0 + (i + 0.5) * width / len(concurrencies)

    parts = [
        f'<text x="{x0 + width / 2}" y="{y0 - 10}" text-anchor="middle" font-size="13" font-weight="bold">{title}</text>',
        f'<line x1="{x0}" y1="{y0 + height}" x2="{x0 + width}" y2="{y0 + height}" stroke="#444"/>',
        f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 + height}" stroke="#444"/>',
    ]
    ticks = 5
    for k in range(ticks + 1):
        if log_y:
            v = math.exp(math.log(bottom) + (math.log(top) - math.log(bottom)) * k / ticks)
        else:
            v = bottom + (top - bottom) * k / ticks
        y = y_of(v)
        label = f"{v:,.0f}" if v >= 100 else f"{v:.2g}"
        parts.append(f'<line x1="{x0 - 4}" y1="{y:.1f}" x2="{x0 + width}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{label}</text>')
    for i, c in enumerate(concurrencies):
        parts.append(f'<text x="{x_of(i):.1f}" y="{y0 + height + 14}" text-anchor="middle" font-size="10">{c}</text>')
    parts.append(
        f'<text x="{x0 + width / 2}" y="{y0 + height + 28}" text-anchor="middle" font-size="10">flows in flight</text>'
    )
    parts.append(f'<text x="{x0 - 44}" y="{y0 - 10}" font-size="10">{unit}</text>')
    for name, colour, vs in series:
        points = [(x_of(i), y_of(v)) for i, v in enumerate(vs) if v == v and v > 0]
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in points:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>')
    return "\n".join(parts)


def write_plots(table, plot_dir):
    os.makedirs(plot_dir, exist_ok=True)
    for layout in sorted({layout for layout, _, _ in table}):
        concurrencies = sorted({c for (l, name, c) in table if l == layout and name == "coordinator"})
        if not concurrencies:
            continue

        def series(field):
            return [
                (name, colour, [table.get((layout, name, c), {}).get(field, float("nan")) for c in concurrencies])
                for name, colour in TARGETS
            ]

        width, height, gap = 260, 200, 90
        charts = [
            svg_chart(70, 50, width, height, "throughput", series("rate"), concurrencies, "flows/s"),
            svg_chart(70 + width + gap, 50, width, height, "p50 of a flow", series("p50"), concurrencies, "ms", True),
            svg_chart(70 + 2 * (width + gap), 50, width, height, "p99 of a flow", series("p99"), concurrencies, "ms", True),
        ]
        legend = []
        for i, (name, colour) in enumerate(TARGETS):
            x = 70 + i * 170
            legend.append(f'<rect x="{x}" y="{height + 95}" width="14" height="4" fill="{colour}"/>')
            label = {"coordinator": "coordinator (strict)", "postgres": "PostgreSQL hand-rolled", "redis": "Redis appendfsync always"}[name]
            legend.append(f'<text x="{x + 20}" y="{height + 101}" font-size="11">{label}</text>')
        total_width = 70 + 3 * width + 2 * gap + 20
        svg = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_width}" height="{height + 115}" '
            f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
            f'<text x="10" y="18" font-size="12">Claim + Complete flows, 500-byte bodies, {layout} '
            f'(medians of the rounds)</text>\n' + "\n".join(charts) + "\n" + "\n".join(legend) + "\n</svg>\n"
        )
        with open(os.path.join(plot_dir, f"durable-{layout}.svg"), "w") as out:
            out.write(svg)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    table = summary(load(sys.argv[1]))
    print_tables(table)
    write_plots(table, sys.argv[2])


if __name__ == "__main__":
    main()
