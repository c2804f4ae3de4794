"""Worker processes (sslab.parallel): results in the jobs' order, one thread a worker, a failure
raised in the caller, the workers' count from SSLAB_WORKERS, progress lines, and no worker left
running once its sweep's process is killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslab import parallel

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_back_in_the_jobs_order(workers):
    jobs = [(pow, (2, i), {}) for i in range(7)]
    assert parallel.run_all(jobs, workers) == [2 ** i for i in range(7)]


def test_workers_are_other_processes_on_one_thread_each():
    pids = parallel.run_all([(os.getpid, (), {})] * 4, 2)
    assert os.getpid() not in pids and 1 <= len(set(pids)) <= 2
    assert parallel.run_all([(torch.get_num_threads, (), {})] * 2, 2) == [1, 1]


def _variable(name):
    return os.environ.get(name)


def test_each_job_sees_the_environment_of_the_process_that_asked(monkeypatch):
    # a worker forked by a fork server started earlier would otherwise see the server's environment
    monkeypatch.setenv(parallel.WORKERS_VARIABLE, "2")
    parallel.start_early()
    monkeypatch.setenv("SSLAB_OUTPUTS", "/somewhere/else")
    monkeypatch.delenv("SSLAB_DATA", raising=False)
    assert parallel.run_all([(_variable, ("SSLAB_OUTPUTS",), {}), (_variable, ("SSLAB_DATA",), {})], 2) == [
        "/somewhere/else", None]
    monkeypatch.setenv("SSLAB_OUTPUTS", "/a/third/place")
    assert parallel.run_all([(_variable, ("SSLAB_OUTPUTS",), {}), (_variable, ("OMP_NUM_THREADS",), {})], 2) == [
        "/a/third/place", "1"]


@pytest.mark.skipif(sys.platform == "win32", reason="no fork server on Windows")
def test_workers_come_from_the_fork_server_with_torch_imported(monkeypatch):
    monkeypatch.setenv(parallel.WORKERS_VARIABLE, "2")
    parallel.start_early()
    assert parallel._context().get_start_method() == "forkserver"
    # a forked worker has the preloaded modules without importing them itself
    loaded = parallel.run_all([(_modules_loaded, (), {})] * 2, 2)
    assert all({"torch", "sslab.evaluate.curve", "sslab.lab.runs"} <= names for names in loaded)


def _modules_loaded():
    return set(sys.modules)


def test_one_worker_runs_everything_here():
    assert parallel.run_all([(os.getpid, (), {})] * 3, 1) == [os.getpid()] * 3


def test_a_failing_job_raises_in_the_caller():
    with pytest.raises(ValueError, match="invalid literal"):
        parallel.run_all([(int, ("12",), {}), (int, ("x",), {})], 2)


def test_each_finished_job_is_reported_with_its_name():
    heard = []

    class Report:
        def done(self, name=""):
            heard.append(name)

    parallel.run_all([(abs, (-i,), {}) for i in range(3)], 2, describe=lambda job: f"abs {job[1][0]}",
                     report=Report())
    assert sorted(heard) == ["abs -1", "abs -2", "abs 0"]


@pytest.mark.parametrize("text, expected", [(None, 1), ("", 1), ("3", 3)])
def test_workers_come_from_the_environment(monkeypatch, text, expected):
    if text is None:
        monkeypatch.delenv(parallel.WORKERS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(parallel.WORKERS_VARIABLE, text)
    assert parallel.default_workers() == expected


@pytest.mark.parametrize("text", ["0", "two", "-1"])
def test_a_bad_worker_count_names_the_variable(monkeypatch, text):
    monkeypatch.setenv(parallel.WORKERS_VARIABLE, text)
    with pytest.raises(ValueError, match=rf"SSLAB_WORKERS={text!r}|SSLAB_WORKERS={text}"):
        parallel.default_workers()


def test_progress_lines_count_to_the_total(capfd):
    progress = parallel.Progress("3 cells", 3, enabled=True)
    progress.done("a")
    progress.done()
    lines = capfd.readouterr().err.splitlines()
    assert lines[0].strip() == "3 cells: 3 to do"
    assert lines[1].strip().startswith("3 cells: 1/3 done (a), ") and lines[1].endswith(" s")
    assert lines[2].strip().startswith("3 cells: 2/3 done, ")
    quiet = parallel.Progress("3 cells", 3, enabled=False)
    quiet.done("a")
    assert capfd.readouterr().err == ""


def _children(pid: int) -> list:
    """``(pid, command line)`` of each process whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append((int(stat.parent.name), command))
    return found


def _workers_of(pid: int) -> list:
    """The worker processes of ``pid``'s sweep: spawned by it, or forked by its fork server (not
    multiprocessing's resource tracker, which ends by itself when its pipe closes)."""
    found = []
    for child, command in _children(pid):
        if b"spawn_main" in command:
            found.append(child)
        elif b"forkserver" in command:
            found += [worker for worker, _ in _children(child)]
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


SWEEP = """
import time
from sslab import parallel
print("started", flush=True)
parallel.run_all([(time.sleep, (120,), {})] * 2, 2)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers end with their parent through Linux's prctl")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_end_when_their_sweep_is_killed(how):
    sweep = subprocess.Popen([sys.executable, "-c", SWEEP], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert sweep.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 60
        while len(workers := [p for p in _workers_of(sweep.pid) if _alive(p)]) < 2:
            assert time.monotonic() < deadline, "the two workers did not start"
            time.sleep(0.1)
        time.sleep(3)  # past the workers' start-up: each is in its job
        sweep.send_signal(how)
        sweep.wait(timeout=30)
        deadline = time.monotonic() + 20
        while [p for p in workers if _alive(p)]:
            assert time.monotonic() < deadline, "a worker outlived its sweep"
            time.sleep(0.1)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()


def test_a_sweeps_runs_train_in_the_notebooks_batch_in_the_order_that_ends_soonest(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from sslab import lab
    from sslab.lab import runs as lab_runs
    settings = lab.check_notebook_params(methods=["vae", "simclr", "siamese-vae", "rotation"], epochs=1, limit=512,
                                         out=str(tmp_path))
    sweep = lab.sweep_configs(settings, "triplet_weight", [0, 5, 20])
    assert [c.settings["triplet_weight"] for c in sweep] == [0, 5, 20] and {c.method for c in sweep} == {"siamese-vae"}
    trained, batches = [], []
    monkeypatch.setattr(lab_runs, "timed_pretrain", lambda config, **options: (
        trained.append(config) or SimpleNamespace(method=config.method), 0.0))

    def one_batch(jobs, workers, describe=None, report=None):
        batches.append([job[1][0] for job in jobs])
        return [function(*args, **kwargs) for function, args, kwargs in jobs]
    monkeypatch.setattr(parallel, "run_all", one_batch)
    monkeypatch.setenv(parallel.WORKERS_VARIABLE, "2")
    runs = lab.pretrain_runs(settings, announce=None, also=sweep)
    assert list(runs) == ["vae", "simclr", "siamese-vae", "rotation"]
    # one batch: the four tasks and the sweep's two other values (5 is siamese-vae's default, its own run),
    # in the order that ends soonest on two workers by the estimated times (rotation 2.1, each siamese-VAE
    # 1.4, VAE and SimCLR 1 per image): rotation, VAE and SimCLR on one worker (4.1), the three
    # siamese-VAEs on the other (4.2), where longest first would end at 4.5
    (batch,) = batches
    costs = [lab_runs.pretrain_cost(c) / lab_runs.pretrain_cost(settings.pretrain_config("vae")) for c in batch]
    assert parallel._makespan(costs, 2) == pytest.approx(4.2)
    assert parallel._makespan(sorted(costs, reverse=True), 2) == pytest.approx(4.5)
    assert sorted(c.method for c in batch) == sorted(["rotation", "siamese-vae", "siamese-vae", "siamese-vae", "vae",
                                                       "simclr"])
    assert sorted(c.settings.get("triplet_weight", 5.0) for c in batch if c.method == "siamese-vae") == [0, 5, 20]
    # after the batch, each returned run is read back (from the store, in the real lab); the sweep's are not
    assert len(trained) == len(batch) + 4


def test_with_one_worker_the_sweeps_runs_train_here_one_by_one(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from sslab import lab
    from sslab.lab import runs as lab_runs
    settings = lab.check_notebook_params(methods=["vae", "siamese-vae"], epochs=1, limit=512, out=str(tmp_path))
    trained = []
    monkeypatch.setattr(lab_runs, "timed_pretrain", lambda config, **options: (
        trained.append(config) or SimpleNamespace(method=config.method), 0.0))
    monkeypatch.setattr(parallel, "run_all", lambda *a, **k: pytest.fail("no batch with one worker"))
    monkeypatch.setenv(parallel.WORKERS_VARIABLE, "1")
    lab.pretrain_runs(settings, announce=None, also=lab.sweep_configs(settings, "triplet_weight", [0, 5]))
    # the two runs of the notebook, then the sweep's other value (5 is siamese-vae's own run)
    assert [(c.method, c.settings.get("triplet_weight")) for c in trained] == [
        ("vae", None), ("siamese-vae", None), ("siamese-vae", 0)]


def test_dispatch_order_is_the_best_order_by_brute_force():
    import itertools
    costs = [126, 84, 84, 60, 60]
    order = parallel.dispatch_order(costs, 2)
    assert sorted(order) == list(range(5))
    # the simulated end: each job to the worker free first; longest first ends at 228 (126+60 | 84+84+60)
    assert parallel._makespan([costs[i] for i in order], 2) == 210
    assert parallel._makespan(sorted(costs, reverse=True), 2) == 228
    for workers in (2, 3):
        for trial in range(20):
            costs = torch.randint(1, 50, (6,), generator=torch.Generator().manual_seed(trial)).tolist()
            best = min(parallel._makespan([costs[i] for i in p], workers) for p in itertools.permutations(range(6)))
            assert parallel._makespan([costs[parallel.dispatch_order(costs, workers)[i]] for i in range(6)],
                                      workers) == best
    assert parallel.dispatch_order([1, 3, 2], 1) == [1, 2, 0]  # one worker: longest first
    assert parallel.dispatch_order(list(range(10)), 2) == list(range(9, -1, -1))  # past the exhaustive limit
