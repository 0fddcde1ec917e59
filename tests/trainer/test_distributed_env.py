"""Rendezvous variables from a Slurm allocation (no launcher), and the preemption flag."""
import os
import signal

import pytest

from binaryduo.trainer import distributed
from binaryduo.trainer.preemption import Preemption


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("gpu[07-12,20],login1", "gpu07"), ("n[001-004]", "n001"),
    ("a[1-2]b[3-4]", "a1b3"), ("x,y[1-3]", "x"), ("rack[3]-node[10-11]", "rack3-node10")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert distributed.first_host(nodelist) == first


def test_slurm_tasks_become_ranks_with_master_on_the_first_node(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[03-06]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    distributed._fill_rendezvous_environment()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert os.environ["MASTER_ADDR"] == "gpu03"
    assert os.environ["MASTER_PORT"] == str(15000 + 123456 % 20000)


def test_launcher_variables_win_over_slurm(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    distributed._fill_rendezvous_environment()
    assert (os.environ["RANK"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == \
        ("0", "10.0.0.1", "29500")


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
