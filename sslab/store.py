"""The run store under ``outputs/``: one folder per run, found again by the hash of its config.

``outputs/runs/<stage>-<method>-<dataset>-<hash>/`` holds ``config.json``, ``model.pt``
(final weights, loadable with ``torch.load(..., weights_only=True)``) and ``metrics.jsonl``
(one line per epoch). While a run trains, ``checkpoint.pt`` holds everything needed to
resume it; ``complete.json`` is written last, so a folder without it is never taken for a
finished run. Every file is written atomically (temporary file, then rename).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

COMPLETE = "complete.json"
# mkstemp creates files 0600; finished files get the mode any other new file would get, so a
# shared run folder stays readable by the people it is shared with.
_UMASK = os.umask(0)
os.umask(_UMASK)
HASH_EXCLUDE = {"device", "data_root", "out", "progress", "force"}


class CorruptCheckpoint(RuntimeError):
    """A checkpoint could not be read; the message names the file."""


def repo_root() -> Optional[Path]:
    """The repository this package was installed from (editable install), if any."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() and (here / "sslab").is_dir() else None


def outputs_root(out: Optional[str] = None) -> Path:
    """Where runs, figures and tables go: ``out`` if given, else ``$SSLAB_OUTPUTS``, else the
    repository's ``outputs/`` — the same folder whatever the working directory (JupyterLab
    runs notebooks in ``notebooks/``, papermill wherever it was launched)."""
    if out:
        return Path(out).expanduser().resolve()
    if os.environ.get("SSLAB_OUTPUTS"):
        return Path(os.environ["SSLAB_OUTPUTS"]).expanduser().resolve()
    root = repo_root()
    return (root / "outputs") if root else (Path.cwd() / "outputs").resolve()


def check_writable(folder: Path, parameter: str = "out") -> Path:
    """Fail before any training when ``folder`` cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PermissionError(f"{parameter}={str(folder)!r} cannot be written ({exc.strerror or exc}); "
                              f"allowed: a folder this user can create and write") from exc
    return folder


def config_hash(config: dict) -> str:
    """A short stable hash of the fields that change a run's result."""
    relevant = {k: v for k, v in config.items() if k not in HASH_EXCLUDE}
    text = json.dumps(relevant, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(text)).strip("_")[:40] or "x"


def run_dir(stage: str, method: str, dataset: str, config: dict, out: Optional[str] = None) -> Path:
    return outputs_root(out) / "runs" / f"{stage}-{slug(method)}-{slug(dataset)}-{config_hash(config)}"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE).is_file()


# ---------------------------------------------------------------- atomic writes

def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data) -> None:
    _atomic(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode() + b"\n"))


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def save_torch(path: Path, obj) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def load_torch(path: Path, map_location="cpu"):
    """``torch.load`` with ``weights_only=True``: a file that would run code when unpickled is
    refused. A truncated or corrupt file raises :class:`CorruptCheckpoint` naming it."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        raise CorruptCheckpoint(f"refused to load {path}: it holds Python objects other than tensors, numbers "
                                f"and containers, and unpickling those could run code. sslab only loads "
                                f"weights-only files; delete it (or the run folder) to train again.") from exc
    except Exception as exc:  # truncated zip, empty file, bad magic number, ...
        first_line = (str(exc).splitlines() or [""])[0][:300]
        raise CorruptCheckpoint(f"cannot load {path}: {type(exc).__name__}: {first_line}. "
                                f"The file is truncated or corrupt; delete it (or the run folder) "
                                f"to train again.") from exc


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill; everything before it is good
    return rows


def truncate_jsonl(path: Path, keep) -> None:
    """Keep only the rows for which ``keep(row)`` is true (used when resuming)."""
    rows = [r for r in read_jsonl(path) if keep(r)]
    write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


# ---------------------------------------------------------------- locking

@contextlib.contextmanager
def locked(folder: Path, wait: bool = True, poll: float = 0.5, announce=print):
    """An exclusive lock on ``folder/.lock`` across processes: two notebooks or papermill jobs
    running the same config wait for each other instead of writing the same files."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            if announce:
                announce(f"waiting for another process that is running {folder.name} ...")
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(poll)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def list_runs(stage: Optional[str] = None, out: Optional[str] = None) -> list:
    runs_root = outputs_root(out) / "runs"
    if not runs_root.is_dir():
        return []
    return sorted(p for p in runs_root.iterdir()
                  if p.is_dir() and is_complete(p) and (stage is None or p.name.startswith(stage + "-")))
