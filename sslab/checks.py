"""Parameter checks, in one place: the command line, the Python API and the notebooks all use
these, so a bad value gets the same one-line message everywhere — the parameter, the value
and what is allowed.

``name`` is how the caller spells the parameter for its user: ``--budgets`` on the command
line, ``budgets`` in Python, ``parameter budgets`` in a notebook. The command lines
(``python -m sslab``, ``python -m sslab.lab``, the benchmarks) parse their flags with
:class:`Parser`, so a bad flag is the same one line.
"""
from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

import numpy as np

# Upper bounds of the counts a person types (epochs, steps, images, rounds, seeds): a value past
# them is a typo, not a plan (--fm-steps 99999999999999999999 would train for 10^16 hours), and
# the check that refuses it says which bound it is.
MAX_EPOCHS = 10_000
MAX_STEPS = 10_000_000
MAX_COUNT = 100_000_000


def fail(name: str, value, allowed: str):
    """Raise the lab's one error for a bad value: ``NAME=VALUE is not allowed; allowed: …``."""
    raise ValueError(f"{name}={value!r} is not allowed; allowed: {allowed}")


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int, what: str = "", maximum: Optional[int] = None,
              allowed: Optional[str] = None) -> int:
    """An integer in [minimum, maximum]; ``what`` says what it counts, e.g. ' (pretraining epochs)';
    ``allowed`` replaces the whole description of what is allowed."""
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f"an integer ≥ {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
        fail(name, value, allowed or bound + what)
    return int(value)


def check_number(name: str, value, low: float = 0.0, high: float = math.inf, *, low_open: bool = True,
                 high_open: bool = False, what: str = "", allowed: Optional[str] = None) -> float:
    """A finite real number in the interval (low, high] (bounds open or closed as asked);
    ``allowed`` replaces the description of what is allowed."""
    ok = (isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
          and math.isfinite(value)
          and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        interval = f"a number > {low:g}" if high == math.inf and low_open else \
            f"a number ≥ {low:g}" if high == math.inf else f"a number in {left}{low:g}, {high:g}{right}"
        fail(name, value, allowed or interval + what)
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        fail(name, value, "True or False")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """One of ``choices``: ``NAME=VALUE is not known; allowed: …`` otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not known; allowed: {', '.join(choices)}")
    return value


def list_items(value) -> list:
    """The items of a list written as text — ``'1,4,16'`` (the command line's way) or
    ``'[1, 4, 16]'`` (papermill's ``-p`` hands a list to a notebook as that string) — or of a
    list, tuple or single value. Empty items are kept (as ``''``) so the checks can refuse them."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        if not text.strip():
            return []
        return [v.strip().strip("'\"") for v in text.split(",")]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _no_repeats(name: str, value, items: list, what: str) -> None:
    if len(set(items)) < len(items):
        fail(name, value, f"{what} without repeats (a repeated value would count one cell twice)")


def check_int_list(name: str, value, minimum: int, what: str) -> tuple:
    """A non-empty list of distinct integers ≥ ``minimum``, in the order given; accepts one
    integer, a list or tuple, or the text forms of :func:`list_items`. ``what`` names the items,
    e.g. 'labeled images per class'."""
    items = list_items(value)
    allowed = f"a non-empty list of integers ≥ {minimum} ({what}), e.g. 1,4,16"
    parsed = []
    for item in items:
        if isinstance(value, str):  # text is parsed; a list must hold integers already
            try:
                item = int(item)
            except ValueError:
                fail(name, value, allowed)
        if not is_int(item) or item < minimum:
            fail(name, value, allowed)
        parsed.append(int(item))
    if not parsed:
        fail(name, value, allowed)
    _no_repeats(name, value, parsed, what)
    return tuple(parsed)


def check_choice_list(name: str, value, choices: Sequence[str], what: str) -> tuple:
    """A non-empty list of distinct names from ``choices``, in the order given (text forms as
    in :func:`list_items`)."""
    items = list_items(value)
    allowed = f"a non-empty list of {what} from: {', '.join(choices)}"
    if not items or any(not isinstance(item, str) or not item for item in items):
        fail(name, value, allowed)
    unknown = [item for item in items if item not in choices]
    if unknown:
        fail(name, value, f"{allowed} ({unknown[0]!r} is not one)")
    _no_repeats(name, value, items, what)
    return tuple(items)


# ---------------------------------------------------------------- the command lines' parser

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default, except where the help already says it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or action.default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line: ``error: …`` (exit code 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")
