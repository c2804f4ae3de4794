"""What verifying the run store's files costs: ``python -m benchmarks.integrity_cost``.

Writes a torch file of each size (a ~46 MB feature cache, a ~1 GB model) with
``sslab.store.save_torch`` into a temporary folder, then times, each the median of
``--repeats``: the sha256 of the file (what :func:`sslab.integrity.verify` computes the first
time a process reads it), a verified ``store.load_torch`` against a plain ``torch.load`` of the same
file (both from the page cache), a second verified load in the same process (the digest is
remembered by inode, size and times), the zip CRC check used for files without a recorded
checksum, and ``store.save_torch`` (hashing while writing, the checksum file written before and
after the rename) against the same atomic write without a checksum, the two alternating.
Prints one row per size; ``--json PATH`` writes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from sslab import integrity, store


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(folder: Path, megabytes: float, repeats: int) -> dict:
    obj = {"features": torch.randn(int(megabytes * 2 ** 20 / 4) // 256, 256)}
    path, plain = folder / f"cache-{megabytes:g}.pt", folder / f"plain-{megabytes:g}.pt"
    saves: dict = {"checksum": [], "none": []}
    for _ in range(repeats):  # alternating, so a change in the machine's load hits both alike
        for kind, save in (("checksum", lambda: store.save_torch(path, obj)),
                           ("none", lambda: store._atomic(plain, lambda f: torch.save(obj, f)))):
            t0 = time.perf_counter()
            save()
            saves[kind].append(time.perf_counter() - t0)
    save_verified, save_plain = statistics.median(saves["checksum"]), statistics.median(saves["none"])
    size = path.stat().st_size

    def fresh_digest():
        integrity._DIGESTS.clear()  # as a new process would: nothing remembered
        integrity.file_digest(path)

    def verified_load():
        integrity._DIGESTS.clear()
        store.load_torch(path)

    def crc_check():
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None

    sha = _median_seconds(fresh_digest, repeats)
    load = _median_seconds(lambda: torch.load(path, weights_only=True), repeats)
    load_verified = _median_seconds(verified_load, repeats)
    store.load_torch(path)
    load_again = _median_seconds(lambda: store.load_torch(path), repeats)
    crc = _median_seconds(crc_check, repeats)
    return {"MB": round(size / 1e6, 1), "sha256_s": round(sha, 4), "sha256_GB_s": round(size / sha / 1e9, 2),
            "torch_load_s": round(load, 4), "verified_load_s": round(load_verified, 4),
            "verified_load_again_s": round(load_again, 4), "zip_crc_s": round(crc, 4),
            "atomic_save_s": round(save_plain, 4), "checksummed_save_s": round(save_verified, 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.integrity_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="46,1024", help="file sizes in MB, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the files go (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for megabytes in (float(s) for s in args.sizes.split(",")):
            rows.append(measure(Path(folder), megabytes, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
