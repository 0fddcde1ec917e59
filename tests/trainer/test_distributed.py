"""Two real gloo ranks (torchrun): exact distributed evaluation, BN sync, disjoint equal shards."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_eval_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")

pytestmark = pytest.mark.slow


def _launch(nproc, root, out):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with socket.socket() as sock:  # torchrun's --master_port 0 hangs the gloo rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run([str(TORCHRUN), "--nproc_per_node", str(nproc), "--master_port", str(port),
                             str(WORKER), str(root), str(out)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(nproc)]


def test_two_ranks_count_every_validation_image_once(tmp_path, fashion_mnist):
    (single,) = _launch(1, fashion_mnist, tmp_path / "one")
    pair = _launch(2, fashion_mnist, tmp_path / "two")
    assert single["images"] == 101
    assert [r["images"] for r in pair] == [101, 101]  # summed over ranks, an odd count, once each
    assert pair[0]["top1"] == pair[1]["top1"]
    # the models differ only in BN means, synced to the average of ranks 0 and 1 (0 and 0.1)
    assert pair[0]["bn_mean"] == pair[1]["bn_mean"] == pytest.approx(0.05)
    assert pair[0]["train_steps"] == pair[1]["train_steps"] == 4  # 64 images: 32 per rank, global batch 16 = 8 per rank
    shards = [set(r["train_indices"]) for r in pair]
    assert not shards[0] & shards[1]
    assert len(shards[0]) == len(shards[1])
