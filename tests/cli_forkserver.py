"""Run many `evomerge` command lines, each in its own process, paying the CLI's import cost once.

A fresh `evomerge` process spends 2-6 s importing torch, transformers and optuna before it looks at its
arguments; the bad-input corpus alone runs dozens of command lines that each fail within milliseconds
after that. This server imports what the commands import, then forks one child per command line: the
child is a fresh process from the command's point of view (its own pid to signal, exit code, cwd,
stdout and stderr files at the descriptor level, atexit handlers), it just starts with the modules
loaded. Anything the imports themselves print would appear on every real run's stderr, so the server
must be silent until it is ready (`CliServer` checks that).

Protocol, one JSON line each way: `{"op": "start", "args": [...], "cwd": ..., "stdout": path, "stderr":
path, "timeout": s}` -> `{"pid": n}`; `{"op": "poll" | "wait", "pid": n}` -> `{"returncode": n | null}`.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

# The console script's entry point and the heavy modules its commands import lazily.
PRELOAD = (
    "evomerge.cli",
    "evomerge.evaluate",
    "evomerge.lineage.packet",
    "evomerge.merge.stream",
    "evomerge.pipelines.evolve",
    "evomerge.search.worker",
    "evomerge.zoo.builder",
)
READY = "ready"


class CliProcess:
    """One running command line: `poll()`, `wait()`, `kill()` like `subprocess.Popen`, then `output()`."""

    def __init__(self, server: CliServer, pid: int, stdout: Path, stderr: Path) -> None:
        self.server, self.pid, self.stdout, self.stderr = server, pid, stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.request({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = self.server.request({"op": "wait", "pid": self.pid})["returncode"]
        return self.returncode

    def kill(self) -> None:
        """SIGKILL, unless the process is known to have ended (as `Popen.kill`: its pid may be reused)."""
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        """What the command wrote to stdout and stderr."""
        return self.stdout.read_text(), self.stderr.read_text()


class CliServer:
    """Client side: `start(args, cwd)` -> `CliProcess`, or `run(args, cwd)` -> (returncode, stdout, stderr)."""

    def __init__(self, env: dict[str, str], scratch: Path) -> None:
        self.scratch = scratch
        self.count = 0
        imports_log = scratch / "imports.log"
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(imports_log)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, text=True,
        )
        ready = self._reply_line()
        printed = imports_log.read_text() if imports_log.exists() else "(no log)"
        if ready != READY or printed:
            # Import-time output (a warning, say) would be on every real `evomerge` run's stderr too.
            raise RuntimeError(f"the CLI server did not start silently: {ready!r}, printed {printed!r}")

    def _reply_line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def request(self, message: dict) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        reply = self._reply_line()
        if not reply:
            raise RuntimeError(f"the CLI server died with exit code {self.process.wait()}")
        return json.loads(reply)

    def start(self, args: list[str], cwd: Path, timeout: float = 300) -> CliProcess:
        """Start `evomerge *args` in `cwd` in a forked child; its stdout/stderr go to files in `scratch`."""
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        request = {"op": "start", "args": args, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                   "timeout": timeout}
        return CliProcess(self, self.request(request)["pid"], out, err)

    def run(self, args: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str, str]:
        """Run `evomerge *args` in `cwd` to the end: (returncode, stdout, stderr)."""
        process = self.start(args, cwd, timeout)
        return process.wait(), *process.output()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _child(request: dict, replies: IO[str]) -> None:
    """Become the command: own cwd and standard streams, then the console script's entry point."""
    from evomerge.cli import run

    replies.close()
    os.chdir(request["cwd"])
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                           (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
        target = os.open(path, mode, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["evomerge", *request["args"]]
    signal.alarm(int(request["timeout"]))  # the default action ends the process: returncode -SIGALRM
    os._exit(_exit_code(run))


def _exit_code(entry_point: Callable[[], None]) -> int:
    """Call `entry_point` and end as the interpreter would: exit code, message or traceback, atexit, flush.

    Only the interpreter's final teardown of every module is skipped (1.5 s with torch loaded, and
    nothing a command can observe).
    """
    try:
        entry_point()
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 -- an uncaught exception: what the interpreter prints, exit 1
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _reap(pid: int, block: bool) -> int | None:
    """The child's exit code (negative signal number when killed), or None while it runs."""
    done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def serve(imports_log: str) -> None:
    # Replies go to a private copy of stdout; whatever the imports print goes to `imports_log`.
    replies = os.fdopen(os.dup(1), "w")
    log = os.open(imports_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    for module in PRELOAD:
        importlib.import_module(module)
    sys.stdout.flush()
    sys.stderr.flush()
    replies.write(READY + "\n")
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            pid = os.fork()
            if pid == 0:
                _child(request, replies)
            reply: dict = {"pid": pid}
        else:
            reply = {"returncode": _reap(request["pid"], block=request["op"] == "wait")}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    os._exit(0)  # stdin closed: done; tearing down torch & co. would only cost another second or so


if __name__ == "__main__":
    serve(sys.argv[1])
