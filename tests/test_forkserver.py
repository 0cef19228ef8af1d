"""Runs' processes forked from a server that has imported the libraries: each gets the caller's environment,
folder and streams, reports its exit like a Popen, and a server that left while idle is replaced."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tunelab.experiment import forkserver

TESTS = str(Path(__file__).parent)


def probe(server, capfd, args, env=None):
    process = server.start("forked_probe", args, {**os.environ, **(env or {})})
    code = process.wait(timeout=120)
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def server():
    started = forkserver.ForkServer()
    yield started
    started.close()


def test_a_forked_run_gets_the_callers_environment_folder_threads_and_streams(server, capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = probe(server, capfd, ["3"], {"TUNELAB_PROBE": "seen", "OMP_NUM_THREADS": "1"})
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 3 and report["probe"] == "seen" and report["cwd"] == str(tmp_path)
    assert report["threads"] == 1 and report["pid"] not in (os.getpid(), server.process.pid)
    assert "to stderr" in err  # written to the caller's current stderr (here pytest's capture)
    code, out, _ = probe(server, capfd, [])
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["probe"] is None  # nothing left from before


def test_a_killed_or_raising_run_reports_like_a_popen(server, capfd):
    code, _, _ = probe(server, capfd, ["kill-self"])
    assert code == -signal.SIGKILL
    code, _, err = probe(server, capfd, ["raise"])
    assert code == 1 and "ValueError: raised in the run" in err
    sleeper = server.start("forked_probe", ["kill-self"], dict(os.environ))
    assert sleeper.wait(timeout=120) == -signal.SIGKILL and sleeper.poll() == -signal.SIGKILL


def test_a_server_that_left_while_idle_is_replaced(monkeypatch, capfd):
    monkeypatch.setenv("TUNELAB_FORK_SERVER_IDLE_S", "1")
    idle = forkserver.ForkServer()
    monkeypatch.delenv("TUNELAB_FORK_SERVER_IDLE_S")
    deadline = time.monotonic() + 120  # it imports the libraries first, then waits a second
    while idle.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert idle.process.returncode == 0
    with pytest.raises(forkserver.ServerLeft):
        idle.start("forked_probe", [], dict(os.environ))
    monkeypatch.setattr(forkserver, "_shared", idle)
    process = forkserver.start_process("forked_probe", ["5"], dict(os.environ))
    assert process.wait(timeout=120) == 5
    assert forkserver._shared is not idle and forkserver._shared.alive
    forkserver._shared.close()


def test_without_the_server_a_fresh_interpreter_runs_the_module(monkeypatch, capfd):
    monkeypatch.setenv("TUNELAB_FORK_SERVER", "0")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, *sys.path])}
    process = forkserver.start_process("forked_probe", ["4"], env)
    assert process.wait(timeout=120) == 4
    assert json.loads(capfd.readouterr().out.strip().splitlines()[-1])["threads"] is None  # no torch imported


def test_the_server_is_used_on_linux_without_cuda_unless_the_environment_says(monkeypatch):
    import torch

    monkeypatch.delenv("TUNELAB_FORK_SERVER", raising=False)
    assert forkserver.wanted() == (sys.platform.startswith("linux") and not torch.cuda.is_available())
    monkeypatch.setenv("TUNELAB_FORK_SERVER", "0")
    assert not forkserver.wanted() and forkserver.start_mode() == "fresh interpreter"
    monkeypatch.setenv("TUNELAB_FORK_SERVER", "1")
    assert forkserver.wanted() == hasattr(os, "fork")
