"""A fork server for the tests' ``binaryduo`` commands (started by tests/conftest.py, one per pytest
process; not a test module).

Every ``binaryduo train`` the suite runs spends ~6 s of its CPU importing torch, DeepSpeed (and,
at its first optimizer, torch._dynamo), MLflow's SQL store and DALI before it reads its recipe:
more than half of a tiny run, and the suite's two workers are CPU-bound. This process imports all
of that once, then forks one child per command, which runs the installed command's entry point
(``binaryduo.trainer.cli.main:main``) in a process of its own, as the console script would: its
own pid (signals, ``kill -9`` faults and their exit statuses are real), working directory,
environment, stdout/stderr files and exit code; atexit handlers run at its exit.

It must be single-threaded when it forks (a thread holding a lock at fork time would leave the
child deadlocked): it checks that no OS thread but its own runs after its imports (except known
fork-safe ones, :data:`FORK_SAFE_THREADS`) and refuses to serve otherwise. Fresh interpreters stay tested where the start-up itself matters: torchrun and
the deepspeed launcher (tests/trainer/test_launchers.py), srun (tests/slurm), the installed wheel
(tests/test_packaging.py); ``BINARYDUO_TEST_FRESH_PROCESSES=1`` sends every command to one.

Protocol (JSON lines): a request ``{"args", "env", "cwd", "stdout", "stderr"}`` on stdin is
answered with ``{"pid": ...}`` when the child is forked and ``{"status": ...}`` when it ended
(a ``subprocess`` return code: negative for a signal).
"""
import atexit
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path


def _preload() -> None:
    """What a ``binaryduo train`` imports on its way (the entry point, then lazily)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import binaryduo.trainer.cli.main  # noqa: F401  (torch, the models, the CLI)
    import deepspeed  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import nvidia.dali  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (what torch.optim imports at the first optimizer)

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _child(request: dict) -> None:
    """Runs the command in this (forked) process and exits with its status; never returns."""
    code = 1
    try:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
                       signal.SIGHUP, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else
                          signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        sys.argv = [request["argv0"], *request["args"]]
        from binaryduo.trainer.cli.main import main
        try:
            code = main(request["args"])
        except SystemExit as stop:  # as the interpreter turns SystemExit into a status
            code = stop.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught error, reported as Python does
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


#: Threads that survive a fork safely: jemalloc's purging thread (a library DeepSpeed's import
#: loads is linked with jemalloc, whose pthread_atfork handlers take its locks around fork() and
#: restart the thread in the child when needed).
FORK_SAFE_THREADS = {"jemalloc_bg_thd"}


def _other_threads() -> list[str]:
    """Names of this process's OS threads other than the main one that are not fork-safe."""
    me = str(os.getpid())
    names = []
    for task in os.listdir("/proc/self/task"):
        if task != me:
            with open(f"/proc/self/task/{task}/comm") as handle:
                names.append(handle.read().strip())
    return [name for name in names if name not in FORK_SAFE_THREADS]


def _status(wait_status: int) -> int:
    return -os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else \
        os.WEXITSTATUS(wait_status)


def serve() -> None:
    _preload()
    answer = sys.stdout
    others = _other_threads()
    if others:
        answer.write(json.dumps({"error": f"threads {others} run after the imports: forking "
                                          "would be unsafe"}) + "\n")
        answer.flush()
        return
    answer.write(json.dumps({"ready": True}) + "\n")
    answer.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        answer.write(json.dumps({"pid": pid}) + "\n")
        answer.flush()
        _, wait_status = os.waitpid(pid, 0)
        answer.write(json.dumps({"status": _status(wait_status)}) + "\n")
        answer.flush()


class ForkServerClient:
    """The tests' side: ``run(argv0, args, cwd=, env=, timeout=)`` returns what
    ``subprocess.run([argv0, *args], capture_output=True, text=True)`` would."""

    def __init__(self, env: dict):
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
        self._buffer = b""
        ready = self._answer(timeout=300)
        if not ready.get("ready"):
            raise RuntimeError(f"the tests' fork server did not start: {ready}")
        atexit.register(self.close)

    def _answer(self, timeout: float | None) -> dict:
        """The next JSON line from the server, or {} when ``timeout`` seconds passed first."""
        fd = self.process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                if not selector.select(timeout):
                    return {}
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError("the tests' fork server exited")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv0: str, args: list[str], *, cwd, env: dict,
            timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="binaryduo-forked-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"argv0": argv0, "args": args, "cwd": str(cwd), "env": env,
                       "stdout": str(out), "stderr": str(err)}
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
            pid = self._answer(timeout=60)["pid"]
            ended = self._answer(timeout=timeout)
            if not ended:
                os.kill(pid, signal.SIGKILL)
                self._answer(timeout=60)
                raise subprocess.TimeoutExpired([argv0, *args], timeout,
                                                out.read_text(errors="replace"),
                                                err.read_text(errors="replace"))
            return subprocess.CompletedProcess([argv0, *args], ended["status"],
                                               out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


if __name__ == "__main__":
    serve()
