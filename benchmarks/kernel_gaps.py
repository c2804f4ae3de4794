"""Where a notebook's own work does not run: from papermill's times in executed notebooks, per
notebook, the seconds from its start to its first cell, to the end of its third cell (its kernel
started and the first cell's imports done), and from the end of its last cell to the notebook's
end (the kernel stopped).

    python -m benchmarks.kernel_gaps outputs/notebooks

Reads the executed copies ``make lab`` writes (``papermill`` metadata: each cell's start and end,
the notebook's start and end); the committed notebooks have those times removed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path


def _time(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def gaps(path: Path) -> dict:
    """``{"to first cell", "to third cell's end", "after last cell", "notebook"}`` seconds of one executed notebook."""
    nb = json.loads(Path(path).read_text())
    run = nb["metadata"].get("papermill", {})
    if not run.get("start_time") or not run.get("end_time"):
        raise ValueError(f"{path} has no papermill times; allowed: an executed copy from make lab (outputs/notebooks)")
    cells = [c["metadata"]["papermill"] for c in nb["cells"]
             if c["cell_type"] == "code" and c["metadata"].get("papermill", {}).get("start_time")]
    start, end = _time(run["start_time"]), _time(run["end_time"])
    third = cells[min(2, len(cells) - 1)]
    return {"to first cell": (_time(cells[0]["start_time"]) - start).total_seconds(),
            "to third cell's end": (_time(third["end_time"]) - start).total_seconds(),
            "after last cell": (end - _time(cells[-1]["end_time"])).total_seconds(),
            "notebook": (end - start).total_seconds()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="executed notebooks (make lab's outputs/notebooks)")
    args = parser.parse_args(argv)
    paths = sorted(args.folder.glob("[0-9]*.ipynb"))
    if not paths:
        parser.error(f"folder={args.folder} holds no executed notebook; allowed: make lab's outputs/notebooks")
    names = list(gaps(paths[0]))
    print("| notebook | " + " | ".join(f"{n} (s)" for n in names) + " |\n|---|" + "---|" * len(names))
    for path in paths:
        row = gaps(path)
        print(f"| {path.stem} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
