"""A pytest plugin for the nbval run in tests/test_notebooks.py (copied there as the run's
conftest.py): nbval executes every cell but keeps what it produced only to compare it, so this
writes each executed notebook, its cells holding this run's outputs, to ``$NBVAL_EXECUTED_DIR``
at the end of the session. The tests then read the tables and sentences the notebooks showed."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat

_NOTEBOOKS: dict = {}  # path → the nbval file item whose notebook object holds the cells


def pytest_runtest_makereport(item, call):
    if call.when != "call" or not hasattr(item, "test_outputs") or not hasattr(item, "cell"):
        return
    # item.cell is the cell object inside item.parent.nb: setting its outputs fills that notebook
    item.cell.outputs = [nbformat.from_dict(dict(output)) for output in (item.test_outputs or [])]
    _NOTEBOOKS[str(item.parent.fspath)] = item.parent


def pytest_sessionfinish(session):
    folder = os.environ.get("NBVAL_EXECUTED_DIR")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    for path, parent in _NOTEBOOKS.items():
        (Path(folder) / Path(path).name).write_text(nbformat.writes(parent.nb, version=4))
