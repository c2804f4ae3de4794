"""Print pip's configured package sources as uv options, so that `make setup` installs with uv from
the same places pip would: each index-url, extra-index-url and find-links that `pip config list`
shows (pip's configuration files and PIP_* variables), one option per value, in pip's order,
without repeats. uv reads none of pip's configuration itself; nothing is printed where pip has none."""
from __future__ import annotations

import re
import subprocess
import sys

OPTIONS = ("index-url", "extra-index-url", "find-links")
LINE = re.compile(r"^[^.]*\.(" + "|".join(OPTIONS) + r")='(.*)'$")


def uv_options(config_list: str) -> list:
    """``["--find-links", "/opt/wheels", ...]`` from the text of ``pip config list``."""
    seen, options = set(), []
    for line in config_list.splitlines():
        found = LINE.match(line.strip())
        if not found:
            continue
        for value in found.group(2).split():
            if (found.group(1), value) not in seen:
                seen.add((found.group(1), value))
                options += [f"--{found.group(1)}", value]
    return options


def main() -> int:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    print(" ".join(uv_options(listed.stdout if listed.returncode == 0 else "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
