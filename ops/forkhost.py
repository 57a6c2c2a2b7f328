"""A preloaded process that forks the workers of a grid on one machine (``LocalGrid``).

Every node and MPC worker is a Python process with torch, SQLAlchemy and Celery in it:
~3.3 s of CPU to import and warm up, and ~280 MB of anonymous memory that the worker's
pool processes share with it copy-on-write — but that ten workers started one by one
each hold privately. This host pays the imports once, freezes what it built out of the
garbage collector's reach (so that no collection dirties the shared pages: ``gc.freeze``),
then forks each worker from itself on request: a worker starts in milliseconds of CPU,
and the workers of a whole simulated grid share those pages (measured in
``ops/bench/RESULTS.md``).

A forked worker runs the very command a shell would (``gridq node start CONFIG``, through
``ops.cli.main``) with its own environment, working directory and log file, in a process
group of its own. Before it runs, it draws fresh seeds for torch, numpy and ``random``: the
host's generators are one state that every fork would otherwise share (gridq's secrets come
from the OS, but Opacus' noise comes from torch's generator).

The wire between ``LocalGrid`` and this host is JSON lines on the host's stdin and stdout
(no pickle): ``{"id", "args", "env", "log", "cwd"}`` in; ``{"id", "pid"}`` once forked and
``{"exit": pid, "code": code}`` once reaped, out. The host ends when its stdin closes; its
workers do not end with it (``LocalGrid.stop`` stops them).
"""

from __future__ import annotations

import gc
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

from setproctitle import setproctitle

REPO = Path(__file__).resolve().parent.parent
#: the commands a host forks (``gridq <group> start``); others start as processes of their own
FORKED = ("node", "mpc", "gateway")


def preload() -> None:
    """Import what a node, MPC or gateway worker imports, build each optimizer once (torch's
    first optimizer imports torch._dynamo and sympy: 1.7 s and ~70 MB), then move every object
    built so far out of the collector's generations."""
    import ops.cli  # noqa: F401 - the commands and their options
    import ops.gateway  # noqa: F401
    import workers.mpc  # noqa: F401
    import workers.worker  # noqa: F401
    from workers.jobs.training import warm_up

    warm_up()
    gc.collect()
    gc.freeze()


def host() -> None:
    """The host's loop: fork a worker for each request line, report each child that ends."""
    preload()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD wakes the loop
    out = os.fdopen(os.dup(1), "w", buffering=1)

    def say(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")

    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    pending = b""
    while True:
        for key, _ in selector.select():
            if key.fd == wake_r:
                os.read(wake_r, 4096)
                _reap(say)
                continue
            data = os.read(0, 65536)
            if not data:
                return  # LocalGrid closed our stdin (or ended): the workers stay its to stop
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _run(request, [wake_r, wake_w, out.fileno(), selector.fileno()])
                try:
                    os.setpgid(pid, pid)  # as the child does: whichever runs first, killpg works at once
                except OSError:
                    pass
                say({"id": request["id"], "pid": pid})


def _reap(say: Any) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _run(request: dict[str, Any], host_fds: list[int]) -> None:
    """In the forked child: become the worker the request names, then exit with its code."""
    code = 1
    try:
        os.setpgid(0, 0)
        setproctitle(" ".join(["gridq", *request["args"]]))  # in ps: the command, not the host's
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in host_fds:
            os.close(fd)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        sys.stdout.reconfigure(write_through=True)  # type: ignore[union-attr] # as PYTHONUNBUFFERED
        sys.stderr.reconfigure(write_through=True)  # type: ignore[union-attr]
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _reseed()
        sys.argv = ["gridq", *request["args"]]
        from ops.cli import main

        main()
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - whatever ends the worker, its log has it
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - exiting anyway
                pass
        os._exit(code)


def _reseed() -> None:
    import numpy as np
    import torch

    torch.seed()
    np.random.seed()
    random.seed()


class Forked:
    """A worker the host forked, with the part of ``subprocess.Popen`` that LocalGrid uses."""

    def __init__(self, host: ForkHost, pid: int) -> None:
        self.host, self.pid = host, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.host.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"gridq worker {self.pid}", timeout or 0.0)
            self.host.wait_for_news(0.2 if left is None else min(left, 0.2))
        assert self.returncode is not None
        return self.returncode


class ForkHost:
    """The host process, started at once (its imports run while the broker and the gateway
    start) and asked for workers with :meth:`spawn`."""

    def __init__(self, log: Path, env: dict[str, str]) -> None:
        self._log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "ops.forkhost"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, env=env, cwd=REPO,
                                         start_new_session=True)
        self._news = threading.Condition()
        self._pids: dict[str, int] = {}
        self._codes: dict[int, int] = {}
        self._count = 0
        self._ended = False
        self._listener = threading.Thread(target=self._listen, name="forkhost", daemon=True)
        self._listener.start()

    def spawn(self, args: list[str], env: dict[str, str], log: Path, cwd: Path, timeout: float = 120.0) -> Forked:
        """Fork a worker running ``gridq ARGS``; returns once it exists (the first call waits
        for the host's imports)."""
        self._count += 1
        request = {"id": str(self._count), "args": args, "env": env, "log": str(log), "cwd": str(cwd)}
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(f"the fork host ended: {self._tail()}") from None
        deadline = time.monotonic() + timeout
        with self._news:
            while request["id"] not in self._pids:
                if self._ended or time.monotonic() > deadline:
                    raise RuntimeError(f"the fork host did not start gridq {' '.join(args)} within {timeout:g} s: "
                                       f"{self._tail()}")
                self._news.wait(0.5)
            return Forked(self, self._pids.pop(request["id"]))

    def exit_code(self, pid: int) -> int | None:
        """The code the host reaped ``pid`` with; once the host is gone, -1 for a process no
        longer there (init reaps it)."""
        with self._news:
            if pid in self._codes:
                return self._codes[pid]
            ended = self._ended
        if ended:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return -1
        return None

    def wait_for_news(self, timeout: float) -> None:
        with self._news:
            self._news.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """End the host (its workers are stopped before, by whoever started them)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._listener.join(timeout=timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def _listen(self) -> None:
        stream: IO[bytes] | None = self.proc.stdout
        assert stream is not None
        for line in stream:
            message = json.loads(line)
            with self._news:
                if "pid" in message:
                    self._pids[message["id"]] = message["pid"]
                else:
                    self._codes[message["exit"]] = message["code"]
                self._news.notify_all()
        with self._news:
            self._ended = True
            self._news.notify_all()

    def _tail(self) -> str:
        try:
            return self._log.read_text()[-2000:] or "(its log is empty)"
        except OSError:
            return "(no log)"


if __name__ == "__main__":
    host()
