"""Open each notebook in JupyterLab in a real browser, run all its cells, and report what ran.

A check by hand, not part of ``make test``: it needs Chromium and playwright, which the lab does
not install (``apt-get install chromium`` and ``pip install playwright`` in any environment;
playwright drives the system's Chromium, so no browser download is needed)::

    /path/to/playwright-env/bin/python tests/browser/jupyterlab_run_all.py \\
        --outputs outputs --screenshots /tmp/jupyterlab-shots

The notebooks are copied to a scratch folder first, so the committed ones are never touched.
JupyterLab is started from this repository's ``.venv`` with ``SSLAB_OUTPUTS`` set to
``--outputs``: pointed at a store ``make lab`` already filled, the notebooks read their runs and
cells back and the check takes minutes; pointed at an empty folder, each notebook computes
everything at its defaults, as a first-time user's would.

For each notebook it clicks Run → Run All Cells, waits until the kernel is idle and no cell is
queued, saves, and reads the saved notebook back: every code cell must have run (an execution
count) and none may hold an error output. It also counts the figures and widgets the browser
rendered. Exit status 1 if any notebook fails.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/status", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer at {url} within {seconds:.0f} s")


def _kernels_busy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/api/kernels", timeout=5) as response:
        return any(k.get("execution_state") != "idle" for k in json.load(response))


def _check_saved(path: Path) -> dict:
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    not_run = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    errors = [f"{o.get('ename')}: {o.get('evalue')}" for c in code for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    return {"code_cells": len(code), "not_run": len(not_run), "errors": errors}


def run_notebook(page, url: str, name: str, folder: Path, timeout_s: float) -> dict:
    page.goto(f"{url}/lab/tree/{name}?reset")  # ?reset: a workspace with this notebook alone
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], "
                           ".jp-mod-idle, .jp-Toolbar-kernelStatus", timeout=120_000)
    time.sleep(2)  # the kernel's start
    started = time.monotonic()
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    time.sleep(3)
    while True:
        queued = page.locator(".jp-InputPrompt", has_text="[*]").count()
        if not queued and not _kernels_busy(url):
            break
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{name}: still running after {timeout_s:.0f} s ({queued} cells queued)")
        time.sleep(2)
    seconds = time.monotonic() - started
    page.keyboard.press("Control+s")
    time.sleep(2)
    figures = page.locator(".jp-OutputArea-output img").count()
    widgets = page.locator(".jp-OutputArea-output .widget-container, .jp-OutputArea-output .jupyter-widgets").count()
    return {"notebook": name, "seconds": round(seconds), "figures": figures, "widgets": widgets,
            **_check_saved(folder / name)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", default="outputs", help="the store the notebooks' kernels use (SSLAB_OUTPUTS)")
    parser.add_argument("--notebooks", default="", help="comma-separated names (default: every notebook)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a notebook may run")
    parser.add_argument("--screenshots", default="", help="a folder for one full-page screenshot per notebook")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    names = [n for n in args.notebooks.split(",") if n] or sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
    folder = Path(tempfile.mkdtemp(prefix="sslab-jupyterlab-"))
    for name in names:
        shutil.copy(REPO / "notebooks" / name, folder / name)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SSLAB_OUTPUTS": str(Path(args.outputs).resolve())}
    server = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "jupyter"), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         "--allow-root", "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
         f"--ServerApp.root_dir={folder}", f"--LabApp.workspaces_dir={folder / 'workspaces'}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"], cwd=folder, env=env,
        stdout=open(folder / "jupyterlab.log", "w"), stderr=subprocess.STDOUT)
    results = []
    try:
        _wait_for_server(url)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for name in names:
                try:
                    result = run_notebook(page, url, name, folder, args.timeout)
                except Exception as exc:  # one notebook's failure is reported; the others still run
                    result = {"notebook": name, "errors": [f"{type(exc).__name__}: {exc}"], "not_run": -1}
                if args.screenshots:
                    Path(args.screenshots).mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(Path(args.screenshots) / f"{Path(name).stem}.png"), full_page=True)
                print(json.dumps(result), flush=True)
                results.append(result)
                page.goto("about:blank")  # close JupyterLab, then end the notebook's session and kernel
                for session in json.load(urllib.request.urlopen(f"{url}/api/sessions")):
                    urllib.request.urlopen(urllib.request.Request(f"{url}/api/sessions/{session['id']}",
                                                                  method="DELETE"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    failed = [r["notebook"] for r in results if r["errors"] or r["not_run"]]
    print(f"{len(results) - len(failed)} of {len(results)} notebooks ran top to bottom without error"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
