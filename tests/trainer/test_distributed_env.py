"""Rendezvous variables from a Slurm allocation (no launcher), and the preemption flag."""
import os
import signal

import pytest

from binaryduo.trainer.runtime import distributed
from binaryduo.trainer.runtime.preemption import Preemption


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("gpu[07-12,20],login1", "gpu07"), ("n[001-004]", "n001"),
    ("a[1-2]b[3-4]", "a1b3"), ("x,y[1-3]", "x"), ("rack[3]-node[10-11]", "rack3-node10")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert distributed.first_host(nodelist) == first


#: The process environment itself, bound before any test replaces ``os.environ``.
REAL_ENVIRON = os.environ


@pytest.fixture
def environ(monkeypatch):
    """A private os.environ: what the function sets must not leak into later subprocesses."""
    env: dict[str, str] = {}
    monkeypatch.setattr(distributed.os, "environ", env)
    return env


def test_slurm_tasks_become_ranks_with_master_on_the_first_node(environ):
    environ.update(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1",
                   SLURM_JOB_NODELIST="gpu[03-06]", SLURM_JOB_ID="123456")
    distributed._fill_rendezvous_environment()
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert environ["MASTER_ADDR"] == "gpu03"
    assert environ["MASTER_PORT"] == str(15000 + 123456 % 20000)


def test_launcher_variables_win_over_slurm(environ):
    environ.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="10.0.0.1",
                   MASTER_PORT="29500", SLURM_PROCID="3", SLURM_NTASKS="4")
    before = dict(REAL_ENVIRON)
    distributed._fill_rendezvous_environment()
    assert (environ["RANK"], environ["MASTER_ADDR"], environ["MASTER_PORT"]) == \
        ("0", "10.0.0.1", "29500")
    assert (environ["WORLD_SIZE"], environ["LOCAL_RANK"]) == ("2", "0")
    # it wrote to os.environ as looked up at call time (the private mapping), not to a
    # reference to the real environment taken at import
    assert environ is not REAL_ENVIRON and dict(REAL_ENVIRON) == before


def test_signals_only_set_a_flag_and_usr1_means_requeue():
    preemption = Preemption()
    try:
        assert not preemption.requested("cpu")
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested("cpu") and not preemption.wants_requeue
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # USR1 (requeue) is not downgraded by a later TERM
        assert preemption.requested("cpu") and preemption.wants_requeue
    finally:
        preemption.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
