"""A real single-node Slurm cluster for the session (Debian's slurmctld/slurmd 22.05 + munge).

Installs the packages when they are missing (root + apt-get), then starts a private munged,
slurmctld and slurmd in the foreground as child processes: own socket, key, ports, state and logs
under a temp dir, a random FirstJobId (so concurrent sessions on one host do not share MASTER_PORTs),
``SLURM_CONF`` pointing at the generated ``slurm.conf``. Afterwards every job is cancelled and the
daemons, and any process still carrying this cluster's ``SLURM_CONF``, are stopped by PID.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
COMMANDS = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged"]
BIN = Path(sys.executable).with_name("binaryduo")


def _missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None]


def _install_slurm() -> str | None:
    """Installs Slurm + munge when missing; returns why it cannot be used (None: ready)."""
    if not _missing_commands():
        return None
    if os.geteuid() != 0:
        return (f"Slurm is not installed ({', '.join(_missing_commands())} missing) and installing "
                f"it needs root: apt-get install {' '.join(PACKAGES)}")
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed and there is no apt-get to install {' '.join(PACKAGES)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(argv)}` did not finish within 600 s"
        if done.returncode != 0:
            return (f"`{' '.join(argv)}` failed ({done.returncode}): "
                    f"{' '.join(done.stderr.split())[-400:]}")
    print(f"\n[slurm fixture] installed {' '.join(PACKAGES)} in {time.monotonic() - started:.1f} s",
          file=sys.stderr)
    missing = _missing_commands()
    return f"still missing after apt-get install: {', '.join(missing)}" if missing else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SLURM_CONF = """\
ClusterName=binaryduo-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# private munged; cred_expire also sets how long a requeued job waits before it starts again
# (default 120 s)
AuthInfo=socket={munge_socket},cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
JobRequeue=1
FirstJobId={first_job_id}
MinJobAge=300
KillWait=10
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """The running test cluster: its config, environment, and helpers to run Slurm commands."""

    def __init__(self, base: Path):
        self.base = base
        self.conf = base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: dict[str, subprocess.Popen] = {}

    # -- commands ---------------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        done = subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
        return done

    def job_fields(self, job_id: str) -> dict[str, str]:
        from binaryduo.slurm.status import parse_scontrol_job

        done = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return parse_scontrol_job(done.stdout) if done.returncode == 0 else {}

    def wait_for(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Polls the job until its state is one of ``states``; returns scontrol's fields."""
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.job_fields(job_id)
            if fields.get("JobState") in states:
                return fields
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} did not reach {sorted(states)} within {timeout:.0f} s; "
                             f"last: {fields.get('JobState')} ({fields.get('Reason')})\n"
                             f"{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.base / "log" / name
            if path.exists():
                out.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(out)

    def cancel_all(self, timeout: float = 30) -> None:
        done = self.run("squeue", "-h", "-o", "%i", check=False)
        jobs = done.stdout.split() if done.returncode == 0 else []
        if not jobs:
            return
        self.run("scancel", *jobs, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.run("squeue", "-h", "-o", "%i", check=False)
            if done.returncode != 0 or not done.stdout.split():
                return
            time.sleep(0.5)

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        base = self.base
        for sub in ("munge", "state", "spool", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)
        os.chmod(base / "munge", 0o755)  # munged: execute permission for all on its socket dir
        key = base / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        socket_path = base / "munge" / "munge.socket"
        self.conf.write_text(SLURM_CONF.format(
            host=socket.gethostname(), ctld_port=_free_port(), slurmd_port=_free_port(),
            munge_socket=socket_path, base=base, first_job_id=random.randint(1000, 19000)))
        self._spawn("munged", ["munged", "-F", f"--socket={socket_path}", f"--key-file={key}",
                               f"--log-file={base / 'log' / 'munged.log'}",
                               f"--pid-file={base / 'munge' / 'munged.pid'}",
                               f"--seed-file={base / 'munge' / 'munged.seed'}"])
        self._wait(lambda: socket_path.exists(), "munged socket", 15)
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])

        def idle() -> bool:
            done = self.run("sinfo", "-h", "-o", "%T", check=False)
            return done.returncode == 0 and done.stdout.strip() == "idle"

        self._wait(idle, "the node to be idle", 60)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.base / "log" / f"{name}.stdout", "w")
        self.processes[name] = subprocess.Popen(argv, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode} while waiting for "
                                       f"{what}\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}\n{self.log_tail()}")

    def stop(self) -> None:
        try:
            if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
                self.cancel_all()
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                process = self.processes.get(name)
                if process is None or process.poll() is not None:
                    continue
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            for pid in self.leftover_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def leftover_pids(self) -> list[int]:
        """Processes (jobs' tasks, slurmstepd) that still carry this cluster's SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found


@pytest.fixture(scope="session")
def slurm_cluster():
    why = _install_slurm()
    if why is not None:
        pytest.skip(why)
    base = Path(tempfile.mkdtemp(prefix="binaryduo-slurm-", dir="/tmp"))
    cluster = SlurmCluster(base)
    previous = os.environ.get("SLURM_CONF")
    try:
        started = time.monotonic()
        cluster.start()
        print(f"\n[slurm fixture] cluster up in {time.monotonic() - started:.1f} s ({base})",
              file=sys.stderr)
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()
        leftovers = cluster.leftover_pids()
        shutil.rmtree(base, ignore_errors=True)
        assert not leftovers, f"processes left behind by the Slurm cluster: {leftovers}"


@pytest.fixture(scope="session")
def binaryduo():
    """Runs the installed ``binaryduo`` in a real process (with the session's SLURM_CONF)."""
    def run(*args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
        full_env.pop("MLFLOW_TRACKING_URI", None)
        return subprocess.run([str(BIN), *map(str, args)], cwd=cwd, env=full_env, text=True,
                              capture_output=True, timeout=timeout)
    return run
