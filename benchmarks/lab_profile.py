"""Where `make lab`'s time goes, from a sampling profile of the whole run and its executed notebooks.

    py-spy record --subprocesses --rate 20 --format raw -o profile.txt -- .venv/bin/python -m sslab.lab
    python -m benchmarks.lab_profile profile.txt outputs/notebooks

prints each notebook's wall time (papermill's record in the executed notebook) and how the CPU
samples of the run (every process: the runner, each notebook's kernel, the worker processes)
divide among the phases of the lab's work, each sample counted once, in the first phase whose
function is on its stack (:data:`PHASES`, in order). A sample is one process's main thread at one
moment (torch's own threads are not Python's), so one process's seconds are wall seconds; worker
processes running side by side add theirs, so the total can exceed the wall time.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

# (phase, the function names that mark it), the first match wins: features and the graph wherever
# they are computed, then a probe trained inside a fine-tuning cell counts as fine-tuning, a head
# trained for a held-out split of a choice counts as that split's, and the labeled images a sweep
# chooses before training its probe heads count as choosing.
PHASES = (
    ("frozen features", ("extract_features",)),
    ("k-NN graph", ("build_pool_graph",)),
    ("pretext test metrics", ("evaluate_task",)),
    ("FixMatch cells", ("compute_fixmatch", "fixmatch_cell")),
    ("self-training cells", ("compute_selftrain", "selftrain_cell")),
    ("fine-tuning cells", ("compute_finetune", "finetune_cell")),
    ("scratch cells", ("compute_scratch", "scratch_cell")),
    ("pretraining (fit)", ("_train_into", "timed_pretrain")),
    # the extra held-out splits (choice_folds) of label propagation's choice: their probe heads and
    # propagations (a self-training cell's count as self-training, above)
    ("choices' held-out splits", ("held_out_scores",)),
    # a sweep chooses its cells' labeled images (TypiClust, ProbCover) before it trains their heads
    ("choosing labeled images", ("labeled_split", "selection_picks")),
    ("probe heads (batched and single)", ("train_heads", "compute_probe", "probe_cells_together", "probe_cell")),
    ("label propagation cells", ("compute_labelprop", "labelprop_cell")),
    # make lab compiles umap's code at the lowest priority beside 00 and 01 (sslab.embed.warm_umap):
    # a sampler cannot tell a process that waits for a core from one that runs, so its samples
    # are mostly waiting, not CPU time
    ("UMAP's compile warm-up (lowest priority, mostly waiting)", ("warm_umap",)),
    ("UMAP", ("umap_2d", "embed")),
    ("method pages and their checks", ("check_pretext_loss", "check_probe_step", "check_finetune_step",
                                       "check_fixmatch_mask", "check_propagation", "check_selection",
                                       "check_typical", "handover")),
    ("figures", ("savefig", "show", "print_figure")),
    ("loading the dataset", ("load_dataset",)),
    ("imports (kernel and worker start)", ("_find_and_load",)),
)


# Threads that wait (the kernels' event loops, heartbeat and output pipes, IPython's history
# thread, a runner waiting for its workers, a worker's watch on the process it works for, the
# executor's queue feeder, tqdm's monitor): the sampler sees them in a system call or a lock's wait,
# but they take no CPU; their samples are left out.
WAITING = {"EpollSelector.select", "OutStream._watch_pipe_fd", "Heartbeat.run", "ParentPollerUnix.run",
           "Condition.wait", "_PollLikeSelector.select", "_end_with_parent.<locals>.watch",
           "GarbageCollectorThread.run", "TMonitor.run"}


def phase_of(frames: list) -> str:
    names = {frame.split(" (")[0] for frame in frames}
    if names & WAITING:
        return WAIT
    for phase, marks in PHASES:
        if names.intersection(marks):
            return phase
    # code written in a notebook cell itself (00's plain PyTorch, the method pages): below an
    # IPython cell's frame ("<module> (<digits>.py:<line>)"), no frame of the lab's package
    cells = [i for i, frame in enumerate(frames) if CELL_FRAME.match(frame)]
    if cells and not any("sslab/" in frame for frame in frames[cells[0]:]):
        return "plain PyTorch in notebook cells (00, the method pages)"
    return "other (Jupyter, papermill, waiting)"


CELL_FRAME = re.compile(r"^<module> \(\d+\.py:\d+\)$")


WAIT = "waiting"


def profile(raw: Path, rate: float) -> dict:
    """CPU seconds per phase from py-spy's raw output (one line per stack: frames; count), the
    waiting threads left out."""
    seconds: dict = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            phase = phase_of(stack.split(";"))
            if phase != WAIT:
                seconds[phase] += int(count) / rate
    return dict(seconds)


def notebook_seconds(folder: Path) -> dict:
    times = {}
    for path in sorted(folder.glob("*.ipynb")):
        meta = json.loads(path.read_text()).get("metadata", {}).get("papermill", {})
        if meta.get("duration") is not None:
            times[path.stem] = meta["duration"]
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="py-spy's --format raw output")
    parser.add_argument("notebooks", type=Path, help="the folder of the executed notebooks (outputs/notebooks)")
    parser.add_argument("--rate", type=float, default=20.0, help="py-spy's --rate (samples per second)")
    args = parser.parse_args(argv)
    times = notebook_seconds(args.notebooks)
    print("| notebook | seconds |\n|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.0f} |")
    print(f"| **all notebooks** | **{sum(times.values()):.0f}** |\n")
    phases = profile(args.raw, args.rate)
    total = sum(phases.values())
    print("| phase | process-seconds | share |\n|---|---|---|")
    for phase, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"| {phase} | {seconds:.0f} | {100 * seconds / total:.0f} % |")
    print(f"| **all** | **{total:.0f}** | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
