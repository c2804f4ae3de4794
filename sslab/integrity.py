"""Checking what the run store reads back: each file's sha256 recorded beside it when written
(``<name>.sha256``, the format of ``sha256sum``), the provenance record torch files carry, and the
one-line errors for a damaged file, a foreign file and a full disk. :mod:`sslab.store` writes and
reads through these; why, and what it costs: docs/reliability.md and docs/BENCHMARKS.md.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Optional

# What the store's files mean (their layout, what a model or checkpoint holds, the networks they
# come from). It is part of every config hash, so a change to it never reuses runs or cells
# written before; raise it whenever such a change is made.
STORE_FORMAT = 2
SUMS_SUFFIX = ".sha256"


class CorruptCheckpoint(RuntimeError):
    """A stored file could not be used; the message names the file and what to do."""


class DamagedFile(CorruptCheckpoint):
    """A file's bytes are not the ones written (flipped or zeroed bytes, a truncated copy)."""


class ForeignFile(CorruptCheckpoint):
    """A file was written for another run, model or kind of file than the one loading it."""


class StoreFull(OSError):
    """A write failed for lack of space; nothing was replaced. ``str()`` is the one-line message."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class _Sink:
    """The file object a writer sees: hashes what passes through (so a checksum costs no second
    read) and keeps the operating system's error, which torch's zip writer may wrap."""

    def __init__(self, f, checksum: bool):
        self.f, self.digest, self.error = f, hashlib.sha256() if checksum else None, None

    def write(self, data) -> int:
        try:
            written = self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        if self.digest is not None:
            self.digest.update(data)
        return written

    def flush(self) -> None:
        self.f.flush()


def sums_path(path: Path) -> Path:
    """Where the sha256 of ``path`` is recorded: ``<name>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + SUMS_SUFFIX)


def _mount_point(path: Path) -> Path:
    path = Path(path).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _no_space(exc: BaseException, sink: Optional[_Sink], path: Path) -> Optional[StoreFull]:
    """The one-line error for a write that failed for lack of space, or None for other failures.
    torch's zip writer reports a failed write as ``RuntimeError`` (``... file write failed``)."""
    cause = sink.error if sink is not None and sink.error is not None else exc
    text = str(exc)
    space = isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
    zip_writer = isinstance(exc, RuntimeError) and ("write failed" in text or "PytorchStreamWriter" in text
                                                    or "unexpected pos" in text)
    if not (space or zip_writer):
        return None
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MB free"
    except OSError:
        free = "free space unknown"
    kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
    message = (f"no space left on {_mount_point(path.parent)} ({free}) to write {path}: {kept}; free some space "
               f"(or write elsewhere: --out) and run the same command again, it resumes where it stopped")
    return StoreFull(errno.ENOSPC, message)



# ---------------------------------------------------------------- verified reads

_DIGESTS: dict = {}  # (file, device, inode, size, mtime, ctime) → its sha256: each file hashed once per process


def _stat_key(path: Path) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _remember(path: Path, digest: str) -> None:
    with contextlib.suppress(OSError):
        while len(_DIGESTS) >= 4096:
            del _DIGESTS[next(iter(_DIGESTS))]
        _DIGESTS[_stat_key(path)] = digest


def file_digest(path: Path) -> str:
    """The sha256 of ``path`` (hex), read in 1 MiB blocks; computed once per process for a file
    that has not changed since (same inode, size, modification and change times)."""
    key = _stat_key(path)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        while len(_DIGESTS) >= 4096:
            del _DIGESTS[next(iter(_DIGESTS))]
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _recorded(path: Path, strict: bool = True) -> Optional[list]:
    """The digests recorded for ``path`` (None when there is no sidecar). A sidecar that is not
    in ``sha256sum`` form is itself damaged."""
    sums = sums_path(path)
    try:
        text = sums.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        if not strict:
            return None
        raise DamagedFile(f"{sums} is damaged ({exc}); {remedy(path)}") from None
    digests = [line.split()[0].lower() for line in text.splitlines() if line.strip()]
    if not digests or not all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests):
        if not strict:
            return None
        raise DamagedFile(f"{sums} is damaged: it does not hold sha256 digests; {remedy(path)}")
    return digests


def remedy(path: Path) -> str:
    """What to do about a damaged or foreign stored file, in words."""
    path = Path(path)
    if path.name == "checkpoint.pt":
        return (f"delete {path} to train that run again from its start (its other files are kept), or put back "
                f"an intact copy")
    if path.parent.parent.name == "runs":
        return f"delete the folder {path.parent} to compute it again, or put back an intact copy of {path.name}"
    return f"delete {path} to write it again, or put back an intact copy"


def verify(path: Path) -> None:
    """Raise :class:`DamagedFile` unless ``path`` holds the bytes that were written: its sha256 is
    one its sidecar records or, for a torch (zip) file without one (written before checksums,
    or copied without it), every member passes its zip CRC check."""
    path = Path(path)
    recorded = _recorded(path)
    if recorded is not None:
        if file_digest(path) not in recorded:
            raise DamagedFile(f"{path} is damaged: its sha256 is not the one recorded in {sums_path(path).name} when "
                              f"it was written; {remedy(path)}")
        return
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            bad = f"({type(exc).__name__}: {exc})"
        if bad is not None:
            raise DamagedFile(f"{path} is damaged: {bad} fails its zip CRC check; {remedy(path)}")


def provenance(kind: str, **identity) -> dict:
    """What made a stored torch file: the store format, its ``kind`` (model, checkpoint, head,
    features) and whatever identifies the run that wrote it (method, backbone, config hash …)."""
    return {"store_format": STORE_FORMAT, "kind": kind, **identity}


def _describe(record: dict) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, dict):
            parts.append(f"{key} ({' '.join(f'{k}={v}' for k, v in sorted(value.items()))})")
        elif isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
            parts.append(f"{key}={value[:12]}…")  # a sha256: its start tells two apart
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def _plain(value):
    """``value`` as JSON gives it back (tuples become lists), so a record read from a JSON file
    compares equal to the same record stored in a torch file."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def check_provenance(obj, path: Path, expect: dict) -> None:
    """Raise :class:`ForeignFile` unless ``obj`` (what ``path`` held) records the provenance
    ``expect`` asks for: every key of ``expect`` (``store_format`` always) must match."""
    expect = {"store_format": STORE_FORMAT, **expect}
    got = obj.get("provenance") if isinstance(obj, dict) else None
    if not isinstance(got, dict):
        raise ForeignFile(f"{path} does not say what made it (written by another program or an older sslab), so "
                          f"it cannot be taken for this run's {expect.get('kind', 'file')} "
                          f"({_describe(expect)}); {remedy(path)}")
    wrong = [k for k in expect if _plain(got.get(k)) != _plain(expect[k])]
    if wrong:
        shown = ["kind"] + [k for k in wrong if k != "kind"]  # what differs, and what the file is
        raise ForeignFile(f"{path} belongs to something else: it holds {_describe({k: got.get(k) for k in shown})} "
                          f"where this run expects {_describe({k: expect.get(k) for k in shown})}; {remedy(path)}")


