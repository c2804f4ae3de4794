"""scripts/pip_sources.py: pip's configured package sources as uv options for make setup."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pip_sources.py"


def _module():
    spec = importlib.util.spec_from_file_location("pip_sources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_source_pip_lists_becomes_one_uv_option_in_order_without_repeats():
    listed = """:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
user.index-url='https://mirror.example/simple'
"""
    assert _module().uv_options(listed) == [
        "--find-links", "/opt/wheels",
        "--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/pypi-more/simple",
        "--index-url", "https://mirror.example/simple"]


def test_nothing_configured_gives_no_option():
    assert _module().uv_options("") == []
    assert _module().uv_options("global.timeout='60'\n") == []
