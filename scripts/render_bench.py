#!/usr/bin/env python3
"""Render a `nemokernels bench` results JSON as a markdown table, optionally into README.md
(between the bench-table markers) and as a bar chart of the ratio to each baseline.

    python scripts/render_bench.py bench/results/h100-80gb-hbm3-2026-01-01.json --readme README.md --plot bench/results/h100.png
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the in-place package from any cwd
from nemokernels.benchmark.harness import format_peaks, table_rows  # noqa: E402

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def markdown(results: dict) -> str:
    header, rows = table_rows(results)
    lines = [
        f"{results['device']}, torch {results['torch']}, nemokernels {results['nemokernels']}, {results['date']}"
        + (" (quick sizes)" if results.get("quick") else ""),
        "",
        format_peaks(results["peaks"]) + ". `vs X`: X's time over ours (> 1: nemokernels is faster).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def update_readme(path: Path, table: str) -> None:
    text = path.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        sys.exit(f"{path}: no {START} ... {END} markers")
    path.write_text(pattern.sub(lambda _: f"{START}\n{table}\n{END}", text, count=1))


def plot(results: dict, out: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot")
        return False
    cases = [c for c in results["cases"] if "error" not in c]
    names = sorted({n for c in cases for n, b in c["baselines"].items() if "ratio" in b})
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(cases)), 4.5))
    for i, name in enumerate(names):
        ratios = [c["baselines"].get(name, {}).get("ratio", 0.0) for c in cases]
        ax.bar([k + i * width for k in range(len(cases))], ratios, width, label=f"vs {name}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([k + width * (len(names) - 1) / 2 for k in range(len(cases))])
    ax.set_xticklabels([f"{c['op']}\n{c['shape']}" for c in cases], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("baseline time / nemokernels time")
    ax.set_title(results["device"] + (" (CPU figures)" if results["cpu_figures"] else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--readme", type=Path, help="replace the table between the bench-table markers")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart of the baseline ratios")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    table = markdown(results)
    print(table)
    if args.readme:
        update_readme(args.readme, table)
        print(f"updated {args.readme}")
    if args.plot and plot(results, args.plot):
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
