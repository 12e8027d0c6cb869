"""One `dsv4 train` per run directory (dsv4cli/train/runlock.py): refusal, release, stale locks, the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_e2e import REPO, _env, cli, metrics, signal_when, write_small_spec

from dsv4cli.train.runlock import LOCK_NAME, RunLock, RunLocked, check_free, holder_alive, read_holder

HOLD = """
import sys, time
from dsv4cli.train.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
if sys.argv[2] == "kill":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(float(sys.argv[2]))
"""


def _holder(run_dir: Path, mode: str = "60"):
    """A separate process holding RUN_DIR's lock (mode: seconds to hold, or "kill" to die holding it)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), mode], cwd=str(REPO), env=_env(),
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _listing(d: Path) -> dict:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*"))}


def test_lock_names_its_holder_and_is_removed_on_release(tmp_path):
    run = tmp_path / "run"
    with RunLock(run, command="dsv4 train x") as lock:
        rec = read_holder(run)
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec["command"] == "dsv4 train x"
        lock.add_child(os.getppid())
        assert read_holder(run)["children"][0][0] == os.getppid()
    assert not (run / LOCK_NAME).exists()
    with RunLock(run):  # free again
        pass


def test_lock_is_released_when_the_body_raises(tmp_path):
    with pytest.raises(KeyError):
        with RunLock(tmp_path):
            raise KeyError("boom")
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(tmp_path).acquire().release()


def test_second_lock_is_refused_naming_pid_and_host_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    p = _holder(run)
    try:
        before = _listing(run)
        for attempt in (lambda: check_free(run), lambda: RunLock(run).acquire()):
            with pytest.raises(RunLocked) as e:
                attempt()
            assert f"pid {p.pid} on host {socket.gethostname()}" in str(e.value) and "checkpoint.dir" in str(e.value)
        assert _listing(run) == before
    finally:
        p.kill()
        p.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    p = _holder(run, "kill")
    assert p.wait(timeout=60) == -signal.SIGKILL
    assert read_holder(run)["pid"] == p.pid, "SIGKILL leaves the lock file behind"
    check_free(run)  # not refused
    with RunLock(run) as lock:
        assert any(f"pid {p.pid}" in n and "no longer running" in n for n in lock.notes), lock.notes
        assert read_holder(run)["pid"] == os.getpid()


def test_record_of_a_live_process_is_obeyed_even_without_flock(tmp_path):
    """A file system where flock does nothing: the record of a live process on this host still counts,
    and a live torchrun child counts as much as the holder itself."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        started = psutil.Process(sleeper.pid).create_time()
        dead = {"pid": 2**22 + 7, "host": socket.gethostname(), "started": 0.0}
        assert not holder_alive(dead)
        assert holder_alive({**dead, "children": [[sleeper.pid, started]]})
        assert not holder_alive({**dead, "children": [[sleeper.pid, started - 100]]}), "a reused pid is not the holder"
        (tmp_path / LOCK_NAME).write_text(json.dumps({**dead, "children": [[sleeper.pid, started]]}))
        with pytest.raises(RunLocked, match=f"pid {dead['pid']} .*whose torchrun \\(pid {sleeper.pid}\\) is still running"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_from_another_host_is_refused_with_the_file_to_delete(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere-node", "started": 0.0}))
    with pytest.raises(RunLocked) as e:
        RunLock(tmp_path).acquire()
    assert "pid 1 on host elsewhere-node" in str(e.value) and str(tmp_path / LOCK_NAME) in str(e.value)


def test_train_into_a_locked_directory_exits_2_at_once_and_writes_nothing(tmp_path):
    spec = write_small_spec(tmp_path)
    run = tmp_path / "run"
    p = _holder(run)
    try:
        before = _listing(run)
        t0 = time.monotonic()
        r = cli("train", str(spec), "--set", f"checkpoint.dir={run}")
        took = time.monotonic() - t0
        assert r.exit_code == 2, r.output
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and f"pid {p.pid} on host {socket.gethostname()}" in errors[0], r.stderr
        assert "Traceback" not in r.output
        assert took < 10, took
        assert _listing(run) == before, "the refused run wrote nothing"
    finally:
        p.kill()
        p.wait()


def _train_proc(spec: Path, run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dsv4cli.cli", "train", str(spec), "--set", f"checkpoint.dir={run}",
                             *extra], cwd=str(REPO), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


_RESULTS = ("step", "loss", "mtp_losses", "grad_norm", "lr", "tokens_seen", "eval_loss", "eval_mtp_losses")


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without timings and memory (which differ between any two runs)."""
    return [{k: r[k] for k in _RESULTS if k in r} for r in metrics(run)]


@pytest.mark.slow
def test_concurrent_run_is_refused_and_the_first_equals_a_lone_run(tmp_path):
    spec = write_small_spec(tmp_path)
    lone, shared = tmp_path / "lone", tmp_path / "shared"
    out, _ = _train_proc(spec, lone).communicate(timeout=300)
    first = _train_proc(spec, shared)
    try:
        deadline = time.time() + 120
        while not (shared / LOCK_NAME).is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        t0 = time.monotonic()
        second = cli("train", str(spec), "--set", f"checkpoint.dir={shared}")
        took = time.monotonic() - t0
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.exit_code == 2 and f"pid {first.pid} " in second.stderr, second.output
    assert took < 10, took
    assert first.returncode == 0, out[-3000:]
    assert _records(shared) == _records(lone), "the first run is exactly a lone run"
    assert [r["step"] for r in metrics(shared)] == [1, 2, 3, 4], "no interleaved records"
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in lone.iterdir())
    assert (shared / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not (shared / LOCK_NAME).exists()


@pytest.mark.slow
def test_lock_left_by_a_sigkilled_run_is_taken_over(tmp_path):
    spec = write_small_spec(tmp_path)
    run = tmp_path / "run"
    killed = _train_proc(spec, run, "--set", "train.steps=100000")
    signal_when(killed, (run / LOCK_NAME).is_file, signal.SIGKILL, timeout=120)
    assert read_holder(run)["pid"] == killed.pid
    r = cli("train", str(spec), "--set", f"checkpoint.dir={run}", "--set", "train.steps=2",
            "--set", "train.eval_interval=0")
    assert r.exit_code == 0, r.output
    assert f"took over the lock of pid {killed.pid}" in r.stderr
    assert [x["step"] for x in metrics(run)][-1] == 2
    assert not (run / LOCK_NAME).exists()


def test_only_node_0_of_a_multi_node_run_takes_the_lock(tmp_path, monkeypatch):
    spec = write_small_spec(tmp_path)
    run = tmp_path / "run"
    started = []

    def fake_run_torchrun(argv, log_path=None, **kwargs):
        started.append((log_path, read_holder(run)))
        return 0

    monkeypatch.setattr("dsv4cli.train.launch.run_torchrun", fake_run_torchrun)
    common = ("train", str(spec), "--set", f"checkpoint.dir={run}", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-endpoint", "127.0.0.1:1")
    r0 = cli(*common, "--node-rank", "0")
    assert r0.exit_code == 0, r0.output
    assert started[0][1]["pid"] == os.getpid(), "node 0 held the lock while torchrun ran"
    assert Path(started[0][0]).name.endswith("-node0.log") and Path(started[0][0]).parent == run / "logs"
    p = _holder(run)
    try:
        r1 = cli(*common, "--node-rank", "1")  # the directory is shared with node 0, which holds it
        assert r1.exit_code == 0, r1.output
        assert started[1][1]["pid"] == p.pid and Path(started[1][0]).name.endswith("-node1.log")
    finally:
        p.kill()
        p.wait()


def test_a_directory_that_cannot_hold_the_lock_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(RunLocked, match="checkpoint.dir: cannot create"):
        RunLock(tmp_path / "file" / "run").acquire()
