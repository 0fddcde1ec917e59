"""At most one host-device synchronisation per training step (issue 14): the stop decision
(non-finite loss or gradients, preemption) and the displayed loss are read in one small all-reduce
per step; everything else (the epoch's loss sum, the logged metrics) stays on the device until
the epoch ends. Counted on 2 real gloo ranks with global-batch BN, as Python-level reads of tensor
values (on a GPU each is a synchronisation; ``count_host_syncs`` uses CUDA's own detector there)."""
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("loop_worker.py")

pytestmark = pytest.mark.slow


def test_one_host_sync_per_training_step(tmp_path, fashion_mnist, torchrun_worker):
    ranks = torchrun_worker(WORKER, 2, "syncs", fashion_mnist, tmp_path / "syncs",
                            out=tmp_path / "syncs")
    for rank, result in enumerate(ranks):
        short, long = result["2"], result["4"]
        per_step = (len(long) - len(short)) / 2
        print(f"rank {rank}: {len(short)} reads in 2 steps, {len(long)} in 4: {per_step:g} per "
              f"step ({sorted(set(long))})")
        # the steady state: one read per step (the agreed stop decision), nothing else
        assert per_step == 1, (rank, short, long)
        # and outside the steps, once per epoch: the epoch's loss sum
        assert len(short) - 2 == 1, (rank, short)
