"""``python -m sslab.lab`` (``make lab``): run the notebooks in order with papermill, print the
headline table, and publish executed copies as the committed notebooks."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import store
from ..checks import HelpFormatter, Parser
from .params import CHECKS, load_params, parse_parameter
from .tables import curve_sentence, gain_frame, pivot_frame, semi_sentence

NOTEBOOKS = ("00_from_scratch", "01_pretext", "02_probe", "03_latent_umap", "04_label_curves", "05_finetune",
             "06_semi_supervised", "07_selection")
# Table names under outputs/tables/ written by the notebooks (the last run of each wins).
TABLES = {"02_probe": "nb02_probe", "04_label_curves": "nb04_label_curves", "05_finetune": "nb05_finetune",
          "06_semi_supervised": "nb06_semi_supervised", "07_selection": "nb07_selection"}


def notebooks_dir() -> Path:
    root = store.repo_root()
    if root is None or not (root / "notebooks").is_dir():
        raise FileNotFoundError("the notebooks/ folder was not found next to the sslab package; run from a "
                                "clone of the repository (pip install -e .)")
    return root / "notebooks"


def check_labels_fit(params: dict, names: Sequence[str], source: Optional[Path] = None) -> None:
    """The ``labels`` and ``budgets`` each notebook in ``names`` will use (given in ``params`` or
    its default) against its dataset, with its ``val_per_class`` (:func:`sslab.data.check_budgets_fit`).
    Checked before the first notebook runs, instead of failing in notebook 02 after the pretraining."""
    import ast

    import papermill

    from ..data import check_budgets_fit, load_dataset
    from ..evaluate import EvalConfig
    source = source or notebooks_dir()
    for name in names:
        declared = papermill.inspect_notebook(str(source / f"{name}.ipynb"))

        def value(parameter, default=None):
            if parameter in params:
                return params[parameter]
            try:
                return ast.literal_eval(declared[parameter]["default"])
            except (KeyError, ValueError, SyntaxError):
                return default

        validation = value("val_per_class", EvalConfig.val_per_class)
        for parameter in ("labels", "budgets"):
            if parameter in declared and value(parameter) is not None:
                counts = CHECKS[parameter](value(parameter))
                dataset = value("dataset", "fashion-mnist")
                check_budgets_fit(dataset, load_dataset(dataset).train.labels, counts, validation,
                                  f"parameter {parameter}", "parameter val_per_class")


def notebook_parameters(path: Path) -> set:
    """The parameter names a notebook declares in its ``parameters`` cell."""
    import papermill
    return set(papermill.inspect_notebook(str(path)))


def _say(text: str) -> None:
    print(text, flush=True)  # at once, also when make's output goes to a pipe or a log file


def execute_notebooks(params: dict, names: Sequence[str] = NOTEBOOKS, output_dir: Optional[Path] = None,
                      announce=_say) -> list:
    """Execute the notebooks in order with papermill (each gets only the parameters it
    declares); returns ``[(name, output path, seconds)]``. Stops at the first failure with the
    notebook, cell and error."""
    source = notebooks_dir()
    # A name no notebook declares (a typo such as 'lables') would be dropped without a word.
    known = set().union(*(notebook_parameters(source / f"{n}.ipynb") for n in NOTEBOOKS))
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"parameter {unknown[0]}={params[unknown[0]]!r} is not declared by any notebook; allowed: "
                         f"{', '.join(sorted(known))}")
    # Each notebook's check cell would refuse a bad value too, but only once the notebooks before
    # it had run (minutes of pretraining for `-p labels abc`): check every value first.
    for name, value in params.items():
        if name in CHECKS:
            CHECKS[name](value)
    check_labels_fit(params, names, source)
    lab_environment()
    output_dir = Path(output_dir) if output_dir else store.outputs_root() / "notebooks"
    output_dir.mkdir(parents=True, exist_ok=True)
    done = []
    warming = warm_umap_in_background(names)
    kernels = KernelsAhead([source / f"{name}.ipynb" for name in names], source)
    try:
        for index, name in enumerate(names):
            done.append(_execute_one(name, params, source, output_dir, index, len(names), announce,
                                     kernels.take(index)))
    finally:
        kernels.close()
        if warming is not None:  # done by now, or no longer of use
            warming.kill()
            warming.wait()
    return done


def first_imports(path: Path) -> list:
    """The import statements of the notebook's first code cell (its lines that start with ``import``
    or ``from`` and are whole statements, comments dropped): what its kernel can import before the
    notebook runs."""
    import nbformat
    for cell in nbformat.read(str(path), as_version=4).cells:
        if cell.cell_type == "code" and cell.source.strip():
            lines = [line.split("#")[0].rstrip() for line in cell.source.splitlines()
                     if line.startswith(("import ", "from "))]
            return [line for line in lines if _whole_statement(line)]
    return []


def _whole_statement(line: str) -> bool:
    try:
        compile(line, "<first cell>", "exec")
    except SyntaxError:  # the first line of an import over several lines: left to the cell
        return False
    return True


class KernelsAhead:
    """The notebooks' kernels, each started as the notebook before it starts (the first two
    together): a kernel starts and imports what its notebook's first cell imports (torch, the lab:
    about 2 s of one core) while the notebook before it runs, on the core that notebook's own first
    seconds leave idle, so the next notebook's first cell finds them imported. The imports run as
    IPython's ``exec_lines``: no cell, no output, no execution count, and a notebook computes the same
    with them done ahead. ``take(i)`` hands over notebook i's kernel; :meth:`stop` ends one at once (its
    notebook has run and every output is in, so nothing waits for a graceful shutdown, which
    ipykernel spends up to 2.5 s of on the fork server and multiprocessing's resource tracker, its
    child processes that end with it anyway); :meth:`close` ends the ones not taken."""

    def __init__(self, paths: Sequence[Path], cwd: Path):
        self.paths, self.cwd = list(paths), cwd
        self.started: dict = {}

    def _start(self, index: int) -> None:
        if index >= len(self.paths) or index in self.started:
            return
        from jupyter_core.utils import run_sync
        km = _local_kernels()(kernel_name="python3")
        preload = [f"--IPKernelApp.exec_lines={line}" for line in first_imports(self.paths[index])]
        run_sync(km.start_kernel)(cwd=str(self.cwd), extra_arguments=preload)
        self.started[index] = km

    def take(self, index: int):
        """Notebook ``index``'s kernel (started now if it was not), and the next notebook's started."""
        self._start(index)
        km = self.started.pop(index)
        self._start(index + 1)
        return km

    @staticmethod
    def stop(km) -> None:
        from jupyter_core.utils import run_sync
        for client in km.clients:
            client.stop_channels()
        if km.has_kernel:
            run_sync(km.shutdown_kernel)(now=True)

    def close(self) -> None:
        for km in self.started.values():
            self.stop(km)
        self.started.clear()


UMAP_NOTEBOOK = "03_latent_umap"


def warm_umap_in_background(names: Sequence[str]):
    """Where the UMAP notebook is to run, compile umap's numba functions into numba's disk cache in a
    process of the lowest priority, started now (:func:`sslab.embed.warm_umap`): it takes the core
    time the notebooks before it leave idle, and the UMAP workers then load the compiled code
    instead of each compiling it (about 20 s of each worker's time in a fresh environment). Returns
    the process, or None where there is nothing to warm."""
    import importlib.util
    import subprocess
    if UMAP_NOTEBOOK not in names or names[0] == UMAP_NOTEBOOK or importlib.util.find_spec("umap") is None:
        return None
    code = ("from sslab.lab.notebooks import lowest_priority; lowest_priority(); "
            "from sslab.embed import warm_umap; warm_umap()")
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def lowest_priority() -> None:
    """This process runs only on the core time others leave idle: nice 19, and where Linux groups
    the processes of a session for the scheduler (autogroup), its session's group at nice 19 too.
    A nice value weighs only within the group, and each notebook's kernel is a session of its own:
    at nice 19 in make lab's group, the UMAP warm-up took half a core from notebook 00's kernel (its
    training cell 36 s instead of 20 s; docs/BENCHMARKS.md)."""
    import os
    os.nice(19)
    try:
        with open("/proc/self/autogroup", "w") as group:
            group.write("19")
    except OSError:  # no autogroup here: the nice value alone then decides
        pass


def _execute_one(name: str, params: dict, source: Path, output_dir: Path, index: int, count: int, announce,
                 kernel) -> tuple:
    """Execute one notebook with papermill (the parameters it declares) in ``kernel`` (a kernel
    manager of :class:`KernelsAhead`, stopped when the notebook ends); ``(name, output path,
    seconds)``, or a RuntimeError with the notebook, cell and error."""
    import papermill
    from papermill.exceptions import PapermillExecutionError
    src = source / f"{name}.ipynb"
    dst = output_dir / f"{name}.ipynb"
    declared = notebook_parameters(src)
    mine = {k: v for k, v in params.items() if k in declared}
    announce(f"[{index + 1}/{count}] {name} " + (" ".join(f"{k}={v}" for k, v in mine.items()) or "(defaults)"))
    started = time.perf_counter()
    try:
        with _Heartbeat(announce, started) as heartbeat:
            papermill.execute_notebook(str(src), str(dst), parameters=mine, cwd=str(source),
                                       kernel_name="python3", progress_bar=False, log_output=False,
                                       km=kernel, on_cell_start=_cell_announcer(heartbeat))
    except PapermillExecutionError as exc:
        raise RuntimeError(f"notebook {name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}; "
                           f"the executed copy with the error is {dst}") from None
    finally:
        KernelsAhead.stop(kernel)
    seconds = time.perf_counter() - started
    announce(f"      done in {seconds:.0f} s → {dst}")
    return name, dst, seconds


def lab_environment() -> None:
    """What the notebooks' kernels inherit from ``make lab``: independent work (pretraining runs, a
    sweep's long cells) in as many one-thread worker processes as there are CPU cores (at most
    four; one on CUDA, where one process keeps the device busy), progress lines on the terminal
    for every long cell (:mod:`sslab.parallel`), and glibc's ``malloc`` keeping freed memory for
    reuse (:mod:`sslab.allocator`). Set any of the variables to override."""
    import os

    from ..allocator import keep_freed_memory_in_children
    from ..parallel import WORKERS_VARIABLE
    cores = 1 if torch.cuda.is_available() else min(4, os.cpu_count() or 1)
    os.environ.setdefault(WORKERS_VARIABLE, str(cores))
    os.environ.setdefault("SSLAB_PROGRESS", "1")
    keep_freed_memory_in_children()


def _local_kernels():
    """Kernels that talk to make lab over local sockets (IPC), not TCP: a kernel on TCP warns at
    every start that its traffic is unencrypted, and a batch run never needs the network."""
    import os
    import tempfile
    import uuid

    from jupyter_client import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir

    class LocalKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            super().__init__(**kwargs)
            # The sockets' path made absolute (IPC's default is relative to the working folder), so a
            # kernel started in the notebooks' folder is reached from any other; in the temporary
            # folder where Jupyter's runtime folder would make it longer than a socket's path may be.
            folder = jupyter_runtime_dir()
            if len(folder) > 64:
                folder = tempfile.gettempdir()
            os.makedirs(folder, exist_ok=True)
            self.ip = os.path.join(folder, f"kernel-{uuid.uuid4().hex[:12]}-ipc")
            self.clients: list = []

        def client(self, **kwargs):
            """A client of this kernel, remembered so :meth:`KernelsAhead.stop` can close it."""
            made = super().client(**kwargs)
            self.clients.append(made)
            return made

    return LocalKernelManager


HEARTBEAT_S = 20.0  # the longest make lab stays silent while a cell runs


class _Heartbeat:
    """A line every ``HEARTBEAT_S`` seconds while a cell runs and nothing else was announced, so a
    long cell (a plain-PyTorch training loop, a UMAP fit) never looks like a hang in make lab's
    output. Progress lines the kernels write themselves go straight to the terminal; the
    heartbeat only fills the gaps between this process's own lines."""

    def __init__(self, announce, started: float, every: float = HEARTBEAT_S):
        import threading
        self._announce, self.started, self.every = announce, started, every
        self.cell: Optional[str] = None
        self.cell_started = self.last = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __call__(self, text: str) -> None:
        self.last = time.perf_counter()
        self._announce(text)

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.every / 3)):
            now = time.perf_counter()
            if self.cell is not None and now - self.last >= self.every:
                self(f"      {now - self.started:5.0f} s  {self.cell} still running "
                     f"({now - self.cell_started:.0f} s so far)")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _cell_announcer(heartbeat: _Heartbeat):
    """A line as each code cell starts (nbclient's ``on_cell_start`` hook): its number, the time
    since the notebook started and its first line, so a long cell shows where the time goes; the
    heartbeat learns which cell runs."""
    def on_cell_start(cell, cell_index):
        if cell.cell_type != "code" or not cell.source.strip():
            return
        first = cell.source.strip().splitlines()[0]
        first = first if len(first) <= 90 else first[:87] + "..."
        heartbeat.cell, heartbeat.cell_started = f"cell {cell_index + 1}", time.perf_counter()
        heartbeat(f"      {time.perf_counter() - heartbeat.started:5.0f} s  cell {cell_index + 1}: {first}")
    return on_cell_start


OUTPUTS_NOTE = "**Outputs shown below**:"
# Cell metadata papermill and the kernel add on every run (times, status): volatile, not committed.
VOLATILE_CELL_KEYS = ("papermill", "execution", "ExecuteTime", "collapsed", "scrolled")


def machine_description() -> str:
    """What ran the notebooks, in words, for the committed notebooks' first cell."""
    import os
    from ..precision import processor  # a run's last digits depend on it (on a CPU: its model and bf16 path)
    version = torch.__version__.split('+')[0]
    if torch.cuda.is_available():
        return f"{processor('cuda:0')} (CUDA), torch {version}"
    return f"CPU: {processor('cpu')} ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {version}"


def published_notebook(executed: Path, machine: str, total_seconds: Optional[float] = None):
    """An executed notebook made fit to commit: papermill's injected-parameters cell and the
    volatile metadata (times, status) removed, outputs and execution counts kept, and the
    first cell's "Outputs shown below" paragraph rewritten from the run itself — parameters
    papermill set, date, machine, and how long the notebook took."""
    import nbformat
    nb = nbformat.read(str(executed), as_version=4)
    run = nb.metadata.get("papermill")
    if run is None:
        raise ValueError(f"{executed} was not executed by papermill; allowed: an executed copy from make lab")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    if errors or run.get("exception"):
        raise ValueError(f"{executed} holds an error output ({errors[0].ename if errors else 'exception'}); "
                         f"only complete runs are published")
    injected = run.get("parameters") or {}
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    for cell in nb.cells:
        for key in VOLATILE_CELL_KEYS:
            cell.metadata.pop(key, None)
        if cell.metadata.get("tags") == []:
            del cell.metadata["tags"]
    nb.metadata = nbformat.from_dict({k: v for k, v in nb.metadata.items() if k in ("kernelspec", "language_info")})
    given = ", ".join(f"`{k}` = {v!r}" for k, v in injected.items())
    if given:
        given = f" except {given}"
        if injected.get("interactive") is False:
            given += " (a batch run: static figures, no widgets)"
    day = str(run.get("end_time") or "")[:10]
    took = f"This notebook took {run['duration']:.0f} s" if run.get("duration") is not None else ""
    if took and total_seconds is not None:
        took += f" (all {len(NOTEBOOKS)} notebooks: {total_seconds:.0f} s)"
    note = (f"{OUTPUTS_NOTE} a real run of the whole pipeline with `make lab` (`python -m sslab.lab`) at this "
            f"notebook's defaults{given}, on {machine}, on {day}. {took + '. ' if took else ''}"
            f"The parameters are the table under the parameters cell.")
    first = nb.cells[0]
    paragraphs = first.source.split("\n\n")
    kept = [p for p in paragraphs if not p.startswith(OUTPUTS_NOTE)]
    first.source = "\n\n".join([*kept, note])
    return nb


def publish(executed_dir: Path, names: Sequence[str] = NOTEBOOKS, machine: Optional[str] = None,
            announce=print, dest: Optional[Path] = None) -> list:
    """Copy the executed notebooks in ``executed_dir`` over ``notebooks/`` (or ``dest``), made fit
    to commit by :func:`published_notebook`. All of them are checked before any is written."""
    import nbformat
    executed = [Path(executed_dir) / f"{name}.ipynb" for name in names]
    missing = [str(p) for p in executed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no executed notebook at {', '.join(missing)}; run make lab first")
    durations = [nbformat.read(str(p), as_version=4).metadata.get("papermill", {}).get("duration") for p in executed]
    total = sum(durations) if all(d is not None for d in durations) and len(names) == len(NOTEBOOKS) else None
    machine = machine or machine_description()
    published = [published_notebook(p, machine, total) for p in executed]
    written = []
    for name, nb in zip(names, published):
        target = Path(dest or notebooks_dir()) / f"{name}.ipynb"
        store.write_text(target, nbformat.writes(nb) + "\n")
        if announce:
            announce(f"published {target}")
        written.append(target)
    return written


def headline(out: Optional[str] = None) -> str:
    """The label-curve table written by notebook 04 (top-1 mean ± std, paired gains), and notebook
    06's semi-supervised table when it ran, as text."""
    from ..evaluate import ResultTable
    tables = store.outputs_root(out) / "tables"
    path = tables / f"{TABLES['04_label_curves']}.json"
    if not path.is_file():
        return f"(no label-curve table at {path}: notebook 04 did not run)"
    table = ResultTable.load(path)
    lines = ["top-1 test accuracy, % (mean ± std over seeds):", pivot_frame(table, "top1").to_string(), "",
             "paired gain over scratch, top-1 percentage points: mean [95 % confidence interval over seeds], "
             "✓ where it excludes 0 (seeds won):", gain_frame(table, "top1").to_string(),
             "", curve_sentence(table), f"table: {path.with_suffix('.csv')}"]
    semi = tables / f"{TABLES['06_semi_supervised']}.json"
    if semi.is_file():
        table = ResultTable.load(semi)
        lines += ["", "with the unlabeled pool (notebook 06), top-1 %:", pivot_frame(table, "top1").to_string(), "",
                  semi_sentence(table), f"table: {semi.with_suffix('.csv')}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = Parser(prog="python -m sslab.lab", formatter_class=HelpFormatter,
                    description="Run the notebooks in order with papermill (make lab), write executed copies to "
                                "outputs/notebooks/ and figures to outputs/figures/, then print the headline table.")
    parser.add_argument("--params", default=None,
                        help="papermill parameter file (e.g. params/smoke.yml, params/full.yml); default: the "
                             "notebooks' own defaults")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="one more parameter (YAML value), e.g. -p labels 5; wins over --params")
    parser.add_argument("--notebooks", default=",".join(n[:2] for n in NOTEBOOKS),
                        help="which notebooks to run, by number, e.g. 01,04")
    parser.add_argument("--interactive", action="store_true",
                        help="keep the ipywidgets in the executed copies (batch runs are static by default)")
    parser.add_argument("--output-dir", default=None, help="where executed notebooks go (default: outputs/notebooks)")
    parser.add_argument("--publish", action="store_true",
                        help="after the run, copy the executed notebooks over notebooks/ (outputs kept, volatile "
                             "metadata removed, first cell says which run produced them): how the committed "
                             "notebooks are made")
    parser.add_argument("--publish-from", default=None, metavar="DIR",
                        help="only publish the executed notebooks already in DIR (e.g. a fresh clone's "
                             "outputs/notebooks), without running anything")
    parser.add_argument("--machine", default=None,
                        help="what ran the notebooks, for the published first cell (default: this machine)")
    args = parser.parse_args(argv)
    if args.publish_from:
        try:
            publish(Path(args.publish_from), machine=args.machine)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        params = load_params(args.params)
        for name, value in args.parameter:
            params[name] = parse_parameter(name, value)
        if not args.interactive:
            params.setdefault("interactive", False)
        wanted = {n.strip() for n in args.notebooks.split(",") if n.strip()}
        names = [n for n in NOTEBOOKS if n[:2] in wanted or n in wanted]
        unknown = wanted - {n[:2] for n in NOTEBOOKS} - set(NOTEBOOKS)
        if unknown or not names:
            raise ValueError(f"--notebooks={args.notebooks!r} is not allowed; allowed: numbers from "
                             f"{', '.join(n[:2] for n in NOTEBOOKS)}")
        started = time.perf_counter()
        done = execute_notebooks(params, names, args.output_dir)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = time.perf_counter() - started
    print()
    if "04_label_curves" in names:
        print(headline())
        print()
    print(f"wall time: {total:.0f} s (" + ", ".join(f"{n} {s:.0f} s" for n, _, s in done) + ")")
    print(f"executed notebooks: {done[0][1].parent}")
    print(f"figures (PNG + PDF): {store.outputs_root() / 'figures'}")
    print(f"tables (CSV + JSON): {store.outputs_root() / 'tables'}")
    print(f"runs: {store.outputs_root() / 'runs'}")
    if args.publish:
        publish(done[0][1].parent, [n for n, _, _ in done], machine=args.machine)
    return 0

