"""What keeping umap's compiled code on disk (sslab.embed.keep_umap_compiled) saves a UMAP worker:
two processes one after the other, each importing umap and fitting notebook 03's shape twice (2000
points of 128 float32 dimensions, one thread), once as umap-learn leaves it and once with the code
kept, each setting in an empty numba cache of its own (a fresh environment's), and whether the two
settings drew the same coordinates.

    python -m benchmarks.umap_cache
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

PROCESS = """
import json, sys, time
import numpy as np
started = time.perf_counter()
import umap  # noqa: F401  (the import compiles and caches umap's and pynndescent's own cached functions)
import sslab.embed
imported = time.perf_counter() - started
if sys.argv[1] != "kept":  # umap_2d as it would be without the lab's switch
    sslab.embed.keep_umap_compiled = lambda: 0
umap_2d = sslab.embed.umap_2d
points = np.random.default_rng(0).standard_normal((2000, 128)).astype(np.float32)
fits = []
for _ in range(2):
    started = time.perf_counter()
    coords = umap_2d(points)
    fits.append(time.perf_counter() - started)
print(json.dumps({"import": imported, "fits": fits, "coords": coords[:50].tolist()}))
"""


def one_process(setting: str, cache: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PROCESS, setting], env=env, check=True, capture_output=True,
                          text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    print("| umap's compiled code | process | import s | first fit s | second fit s |\n|---|---|---|---|---|")
    coords = {}
    for setting in ("as umap-learn leaves it", "kept"):
        with tempfile.TemporaryDirectory() as cache:
            for process in (1, 2):
                row = one_process("kept" if setting == "kept" else "plain", cache)
                coords.setdefault(setting, row["coords"])
                print(f"| {setting} | {process} | {row['import']:.1f} | {row['fits'][0]:.1f} | {row['fits'][1]:.1f} |",
                      flush=True)
    same = len({json.dumps(c) for c in coords.values()}) == 1
    print(f"\nthe same coordinates with either setting: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
