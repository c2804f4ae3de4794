"""The run store under ``outputs/``: one folder per run, found again by the hash of its config.

``outputs/runs/<stage>-<method>-<dataset>-<hash>/`` holds ``config.json``, ``model.pt``
(final weights, loadable with ``torch.load(..., weights_only=True)``) and ``metrics.jsonl``
(one line per epoch). While a run trains, ``checkpoint.pt`` holds everything needed to
resume it; ``complete.json`` is written last, so a folder without it is never taken for a
finished run. Every file is written atomically (temporary file, then rename).

Every file the store reads back is verified first: beside each one, ``<name>.sha256`` holds the
sha256 recorded when it was written (the format of ``sha256sum``), and torch files carry a
``provenance`` record of what made them (store format, kind, method, backbone, config hash),
which the run loading them compares with its own (:mod:`sslab.integrity`). A file whose bytes
changed is *damaged* (:class:`~sslab.integrity.DamagedFile`), one made for another run is
*foreign* (:class:`~sslab.integrity.ForeignFile`); both messages name the file and say what to
do. Why, and what it costs: docs/reliability.md.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from .integrity import (STORE_FORMAT, CorruptCheckpoint, DamagedFile, _no_space, _recorded, _remember, _Sink,
                        check_provenance, file_digest, remedy, sums_path, verify)

COMPLETE = "complete.json"
# mkstemp creates files 0600; finished files get the mode any other new file would get, so a
# shared run folder stays readable by the people it is shared with.
_UMASK = os.umask(0)
os.umask(_UMASK)
HASH_EXCLUDE = {"device", "data_root", "out", "progress", "force"}


def repo_root() -> Optional[Path]:
    """The repository this package was installed from (editable install), if any."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() and (here / "sslab").is_dir() else None


def outputs_root(out: Optional[str] = None) -> Path:
    """Where runs, figures and tables go: ``out`` if given, else ``$SSLAB_OUTPUTS``, else the
    repository's ``outputs/`` — the same folder whatever the working directory (JupyterLab
    runs notebooks in ``notebooks/``, papermill wherever it was launched). A path that can
    never be a folder is refused here, naming ``out`` or ``SSLAB_OUTPUTS``
    (:func:`check_outputs_path`)."""
    if out:
        return check_outputs_path("out", out)
    if os.environ.get("SSLAB_OUTPUTS"):
        return check_outputs_path("SSLAB_OUTPUTS", os.environ["SSLAB_OUTPUTS"])
    root = repo_root()
    return (root / "outputs") if root else (Path.cwd() / "outputs").resolve()


OUTPUTS_ALLOWED = "a folder this user can create and write"


def check_outputs_path(parameter: str, value) -> Path:
    """``value`` as an absolute path, if it is a folder or one can be created there; else the
    lab's one-line error naming ``parameter``: a symbolic-link loop, a file, a path under a file,
    a name the file system refuses. Otherwise the first read or write under it would fail with a
    raw system error (or, for a loop, a traceback) far from the setting that caused it."""
    def refuse(reason: str):
        raise ValueError(f"{parameter}={str(value)!r} is not allowed: {reason}; allowed: {OUTPUTS_ALLOWED}")

    loop = "it goes through a loop of symbolic links"
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~user for a user this machine does not know
        refuse("its ~ names no home folder on this machine")
    try:
        folder = path.resolve()
    except RuntimeError:  # Python before 3.13 raises this for a symbolic-link loop
        refuse(loop)
    except OSError as exc:
        refuse(f"it cannot be used ({exc.strerror or exc})")
    # The nearest part of the path that exists must be a folder (later Pythons resolve a loop
    # without a word: it shows here, as ELOOP).
    for part in (folder, *folder.parents):
        try:
            mode = part.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):  # not there yet, or under a file: look higher
            continue
        except OSError as exc:
            refuse(loop if exc.errno == errno.ELOOP else f"it cannot be used ({exc.strerror or exc})")
        if not stat.S_ISDIR(mode):
            refuse(f"{part} is a file, not a folder" if stat.S_ISREG(mode) else f"{part} is not a folder")
        break
    return folder


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


# Raised whenever the code computes other numbers for the same settings (another optimiser
# kernel, another normalisation of the features): runs and cells stored before are then not
# reused, so one outputs folder never mixes numbers of two versions of the arithmetic. 2: fused
# optimiser steps, probe heads standardised with the pool's statistics.
RESULTS_VERSION = 2


def config_hash(config: dict) -> str:
    """A short stable hash of the fields that change a run's result, of the store format and of
    the version of the arithmetic (:data:`RESULTS_VERSION`)."""
    relevant = {k: v for k, v in config.items() if k not in HASH_EXCLUDE}
    relevant["store_format"] = STORE_FORMAT
    if RESULTS_VERSION > 1:  # version 1 is the hash as it was before the version existed
        relevant["results_version"] = RESULTS_VERSION
    text = json.dumps(relevant, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def folder_hash(config: dict) -> str:
    """The hash in a run or cell folder's name: :func:`config_hash` of the config and, for a
    ``folder:PATH`` dataset, of a fingerprint of its files (names, sizes, modification times),
    so adding, removing or moving images gives new runs and cells instead of reusing old ones."""
    dataset = config.get("dataset")
    if isinstance(dataset, str) and dataset.startswith("folder:"):
        from .data import folder_fingerprint
        config = {**config, "dataset_files": folder_fingerprint(dataset[len("folder:"):])}
    return config_hash(config)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(text)).strip("_")[:40] or "x"


def run_dir(stage: str, method: str, dataset: str, config: dict, out: Optional[str] = None) -> Path:
    return outputs_root(out) / "runs" / f"{stage}-{slug(method)}-{slug(dataset)}-{folder_hash(config)}"


# A name becomes files such as <name>.csv, <name>.json and figures <name>.png/.pdf: one plain
# file name, short enough for every file system (255 bytes) with its suffixes.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME = 120


def check_file_name(parameter: str, value) -> str:
    """``value`` if it is one plain file name (letters, digits, ``.``, ``_``, ``-``; no folder part,
    not hidden, at most :data:`MAX_NAME` characters), else the lab's one-line error."""
    if not isinstance(value, str) or len(value) > MAX_NAME or not _FILE_NAME.fullmatch(value) or ".." in value:
        shown = value if not isinstance(value, str) or len(value) <= 60 else value[:57] + "..."
        raise ValueError(f"{parameter}={shown!r} is not allowed; allowed: one file name of 1 to {MAX_NAME} letters, "
                         f"digits, '.', '_' or '-' (no '/', no '..', not starting with '.'), e.g. my-curve")
    return value


def folder_config_hash(folder: Path) -> str:
    """The config hash of the run or cell in ``folder``, from its (verified) ``config.json``: what
    the files written in it record as the run that made them."""
    return config_hash(read_json(Path(folder) / "config.json"))


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE).is_file()


# ---------------------------------------------------------------- atomic, checksummed writes

def _atomic(path: Path, write, checksum: bool = False) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, then rename it over ``path``:
    a kill leaves either the old file or the new one, never a mix. With ``checksum``, the
    sidecar lists the new file's sha256 before the rename and keeps the old file's until after
    it, so whichever of the two a kill leaves verifies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    sink = None
    previous: list = []
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f, checksum)
            write(sink)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        if checksum:
            digest = sink.digest.hexdigest()
            previous = []
            if path.exists():  # a file without a sidecar (written before checksums) is hashed now
                previous = [d for d in (_recorded(path, strict=False) or [file_digest(path)]) if d != digest]
            _write_sums(path, [digest, *previous][:8])
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        full = _no_space(exc, sink, path)
        if full is not None:
            raise full from exc
        raise
    if checksum:
        if previous:  # the old file is gone: only the new digest stays valid
            with contextlib.suppress(OSError):
                _write_sums(path, [digest])
        _remember(path, digest)


def _write_sums(path: Path, digests: Sequence[str]) -> None:
    text = "".join(f"{d}  {Path(path).name}\n" for d in digests)
    _atomic(sums_path(path), lambda f: f.write(text.encode()))


def remove(path: Path) -> None:
    """Delete a stored file and its recorded checksum (nothing happens if they are absent)."""
    Path(path).unlink(missing_ok=True)
    sums_path(path).unlink(missing_ok=True)


def write_json(path: Path, data, checksum: bool = True) -> None:
    """Write ``data`` as JSON, atomically, with its sha256 recorded beside it (``checksum``)."""
    _atomic(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode() + b"\n"),
            checksum)


def write_text(path: Path, text: str, checksum: bool = False) -> None:
    _atomic(path, lambda f: f.write(text.encode()), checksum)


def save_torch(path: Path, obj, provenance: Optional[dict] = None) -> None:
    """``torch.save`` atomically, with its sha256 recorded beside it. ``provenance`` (a dict from
    :func:`provenance`) is stored in ``obj`` (a dict) under ``"provenance"``, for
    :func:`load_torch`'s ``expect`` to compare."""
    if provenance is not None:
        obj = {**obj, "provenance": provenance}
    _atomic(path, lambda f: torch.save(obj, f), checksum=True)


# ---------------------------------------------------------------- verified reads (sslab.integrity)

def load_torch(path: Path, map_location="cpu", expect: Optional[dict] = None):
    """``torch.load`` with ``weights_only=True`` after :func:`verify`: a file whose bytes changed
    raises :class:`DamagedFile`, a file that would run code when unpickled is refused
    (:class:`CorruptCheckpoint`), and with ``expect`` one written for something else raises
    :class:`ForeignFile` (:func:`check_provenance`). Every message names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"{path} does not exist", str(path))
    verify(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        raise CorruptCheckpoint(f"refused to load {path}: it holds Python objects other than tensors, numbers "
                                f"and containers, and unpickling those could run code. sslab only loads "
                                f"weights-only files; delete it (or the run folder) to train again.") from exc
    except Exception as exc:  # truncated zip, empty file, bad magic number, ...
        first_line = (str(exc).splitlines() or [""])[0][:300]
        raise DamagedFile(f"{path} is damaged: it cannot be read ({type(exc).__name__}: {first_line}); "
                          f"{remedy(path)}") from exc
    if expect is not None:
        check_provenance(obj, path, expect)
    return obj


def read_json(path: Path, required: Iterable[str] = ()):
    """The JSON in ``path`` after :func:`verify`; a file that is not valid JSON, or (for a mapping)
    lacks a key of ``required``, raises :class:`DamagedFile` naming it."""
    path = Path(path)
    verify(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        problem = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise DamagedFile(f"{path} is damaged: it is not valid JSON ({problem}{where}); {remedy(path)}") from None
    missing = [k for k in required if not isinstance(data, dict) or k not in data]
    if missing:
        raise DamagedFile(f"{path} is damaged: it has no {', '.join(map(repr, missing))}; {remedy(path)}")
    return data


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line (a line cut by a full disk or a kill is skipped when read back)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        full = _no_space(exc, None, Path(path))
        if full is not None:
            raise full from exc
        raise


def read_jsonl(path: Path) -> list:
    """The rows of a JSON-lines file. A line that is not JSON (cut by a kill, or damaged) is
    skipped with a warning; every other row is kept."""
    path = Path(path)
    if not path.is_file():
        return []
    rows, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    if bad and bad != [number]:  # a last line cut by a kill is expected; others are worth a word
        print(f"{path}: skipped line(s) {', '.join(map(str, bad))}, not JSON rows", file=sys.stderr)
    return rows


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """Replace a JSON-lines file by ``rows``, atomically."""
    write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def truncate_jsonl(path: Path, keep) -> None:
    """Keep only the rows for which ``keep(row)`` is true (used when resuming)."""
    write_jsonl(path, [r for r in read_jsonl(path) if keep(r)])


# ---------------------------------------------------------------- locking

LOCKS = ".locks"


def lock_path(folder: Path) -> Path:
    """The lock file of a run or cell folder: beside it, ``<parent>/.locks/<name>.lock``. Not
    inside it, so taking the lock makes no folder (a cell refused or failed under its lock
    leaves nothing behind: a folder exists only once something is written into it), and
    ``--force``'s swap of two folders by renaming does not carry the lock away with them."""
    folder = Path(folder)
    return folder.parent / LOCKS / f"{folder.name}.lock"


@contextlib.contextmanager
def locked(folder: Path, wait: bool = True, poll: float = 0.5, announce=print):
    """An exclusive lock on ``folder`` across processes (``flock`` on :func:`lock_path`): two
    notebooks or papermill jobs running the same config wait for each other instead of writing
    the same files. The lock file is removed when the lock is let go, and ``.locks`` with it
    when no other lock is in it."""
    import fcntl

    folder = Path(folder)
    path = lock_path(folder)
    announced = False
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle = open(path, "a+")
        except FileNotFoundError:  # another process removed the empty .locks folder in between
            continue
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise
                if announce and not announced:
                    announce(f"waiting for another process that is running {folder.name} ...")
                    announced = True
                while True:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        time.sleep(poll)
        except BaseException:
            handle.close()
            raise
        # The holder before us removed the file as it let go, and a third process may hold a new
        # file at the same path: only a lock on the file at the path is the folder's.
        if _is_file_at(handle, path):
            break
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still held: a process waiting on this file sees it is gone
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only when no other lock is there: outputs/runs holds run folders alone
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _is_file_at(handle, path: Path) -> bool:
    """Whether the open ``handle`` is the file now at ``path`` (same device and inode)."""
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(handle.fileno())
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def list_runs(stage: Optional[str] = None, out: Optional[str] = None) -> list:
    runs_root = outputs_root(out) / "runs"
    if not runs_root.is_dir():
        return []
    return sorted(p for p in runs_root.iterdir()
                  if p.is_dir() and is_complete(p) and (stage is None or p.name.startswith(stage + "-")))
