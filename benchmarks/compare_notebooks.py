"""Which printed results two runs of the notebooks share: every code cell's text outputs (what it
printed, and the text form of its tables), line by line, in two folders of notebooks — the
committed ones and the executed copies of a ``make lab`` run, or two runs' copies — with what
differs between any two runs of the same results left out: seconds (``81 s``, ``in 86 s``), the
workers' and pretraining runs' progress lines, the runner's ``still running`` lines and figure
sizes. papermill's injected-parameters cell (executed copies only) is skipped, so the cells of a
committed notebook and of an executed copy line up.

    python -m benchmarks.compare_notebooks notebooks outputs/notebooks            # a count per notebook
    python -m benchmarks.compare_notebooks notebooks outputs/notebooks --show 20  # and the first 20 lines that differ
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
from pathlib import Path

# Lines that differ between two runs of the same results: progress and figure handles.
VOLATILE = re.compile(r"cells, \d+ workers?:|pretraining runs:|still running|<Figure size|^\s*done in ")
SECONDS = re.compile(r"\b\d+(?:\.\d+)? s\b")


def result_lines(path: Path) -> list:
    """``[(code cell number, [lines])]`` of one notebook: each code cell's text outputs, the
    volatile lines dropped and every count of seconds written ``N s``."""
    nb = json.loads(Path(path).read_text())
    cells, number = [], 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            continue
        number += 1
        lines = []
        for output in cell.get("outputs", []):
            text = output.get("text") or output.get("data", {}).get("text/plain") or ""
            text = "".join(text) if isinstance(text, list) else text
            lines += [SECONDS.sub("N s", line.rstrip()) for line in text.splitlines()
                      if line.strip() and not VOLATILE.search(line)]
        cells.append((number, lines))
    return cells


def compare(first: Path, second: Path) -> dict:
    """``{"lines", "differ", "diff"}`` of one notebook in two runs: the result lines of the first,
    how many of them the second does not print in the same cell, and the unified diff's changed
    lines, prefixed with the cell number."""
    a, b = result_lines(first), result_lines(second)
    if [n for n, _ in a] != [n for n, _ in b]:
        raise ValueError(f"{first} and {second} have different code cells; allowed: two runs of the same notebook")
    lines = differ = 0
    diff = []
    for (number, old), (_, new) in zip(a, b):
        lines += len(old)
        changed = [line for line in difflib.unified_diff(old, new, lineterm="", n=0)
                   if line[:1] in "+-" and not line.startswith(("---", "+++"))]
        differ += sum(line.startswith("-") for line in changed)
        diff += [f"[{number}] {line}" for line in changed]
    return {"lines": lines, "differ": differ, "diff": diff}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="a folder of notebooks (e.g. notebooks, the committed ones)")
    parser.add_argument("second", type=Path, help="another run's folder (e.g. outputs/notebooks)")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="also print each notebook's first N changed lines")
    args = parser.parse_args(argv)
    if args.show < 0:
        parser.error(f"--show {args.show}: allowed: 0 or more lines")
    names = sorted(p.name for p in args.first.glob("*.ipynb") if (args.second / p.name).is_file())
    if not names:
        parser.error(f"no notebook is in both {args.first} and {args.second}; "
                     f"allowed: two folders of the same notebooks")
    print("| notebook | result lines | lines that differ |\n|---|---|---|")
    reports = {name: compare(args.first / name, args.second / name) for name in names}
    for name, report in reports.items():
        print(f"| {Path(name).stem} | {report['lines']} | {report['differ']} |")
    for name, report in reports.items():
        if args.show and report["diff"]:
            print(f"\n{Path(name).stem}:")
            print("\n".join(report["diff"][:args.show]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
