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


def test_a_reply_left_unread_by_an_interrupted_start_is_not_taken_for_the_next(server, capfd):
    server.requests += 1  # a start interrupted after sending its request: its reply is never read
    server._send({"id": server.requests, "module": "forked_probe", "args": ["0"], "env": dict(os.environ),
                  "cwd": os.getcwd(), "path": sys.path, "ignore_sigint": False}, [0, 1, 2])
    assert server.start("forked_probe", ["7"], dict(os.environ)).wait(timeout=120) == 7


@pytest.mark.parametrize("start", ["fork server", "fresh interpreter"])
def test_a_run_ignores_ctrl_c_when_asked_and_otherwise_as_this_process_does(start, server, capfd, monkeypatch):
    """run_in_child asks for it (its run ignores Ctrl-C until the loop takes it over); other starts follow this
    process: a test run started in the background (`cmd &`) begins with Ctrl-C ignored, as a fresh interpreter
    would inherit."""
    def ignores_ctrl_c(**asked):
        process = forkserver.start_process("forked_probe", [], dict(os.environ), **asked)
        assert process.wait(timeout=120) == 0
        return json.loads(capfd.readouterr().out.strip().splitlines()[-1])["ignores_ctrl_c"]
    if start == "fork server":
        monkeypatch.setattr(forkserver, "_shared", server)
    else:  # set between fork and exec there (this process need not ignore Ctrl-C meanwhile)
        monkeypatch.setattr(forkserver, "shared_server", lambda env=None: None)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert ignores_ctrl_c(ignore_sigint=True) and not ignores_ctrl_c()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert ignores_ctrl_c() and not ignores_ctrl_c(ignore_sigint=False)
    finally:
        signal.signal(signal.SIGINT, previous)


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


def test_a_setting_libraries_read_at_import_starts_a_new_server(server, monkeypatch):
    # last in this file: it sends the module's server away
    monkeypatch.setattr(forkserver, "_shared", server)
    same = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "1"}  # a run sets these itself
    assert forkserver.shared_server(same) is server
    other = forkserver.shared_server({**os.environ, "MALLOC_ARENA_MAX": "2"})
    try:
        assert other is not server and other.frozen["MALLOC_ARENA_MAX"] == "2" and not server.connected
    finally:
        other.close()
