"""Global-batch BatchNorm (binaryduo.trainer.runtime.sync_batchnorm) on real ranks (torchrun).

Two ranks with batches of 3 and 5 images compute what one process computes on the batch of 8:
output, input gradient, parameter gradients summed over ranks, running statistics (momentum 0.1
and the cumulative average), ``num_batches_tracked`` -- on gloo (CPU) through the float64 path,
and through the fused CUDA path's wrapper with CPU stand-ins for its kernels; on NCCL (2 GPUs)
through PyTorch's fused kernels. The worker (global_bn_worker.py) says how. On gloo the network
also trains compiled (``compile: true``) as it trains eagerly, in one graph.
"""
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("global_bn_worker.py")

pytestmark = pytest.mark.slow

CLASSES = ["Float32BatchNorm2d", "DecoupledBatchNorm2d"]


@pytest.fixture(scope="module")
def cpu_ranks(tmp_path_factory, torchrun_worker):
    """One launch of 2 gloo ranks doing every CPU case (about 10 s, plus ~10 s compiling)."""
    out = tmp_path_factory.mktemp("global-bn") / "cpu"
    return torchrun_worker(WORKER, 2, "cpu", out, out=out)


def _assert_matches(case: dict, *, rel: float, grads_rel: float | None = None) -> None:
    for key in ("output", "input_grad", "running_mean", "running_var"):
        assert case[key] < rel, (key, case)
    assert case["param_grads"] < (grads_rel or rel), case
    assert case["batches_tracked"] == [3, 3], case  # 3 steps, counted once per step
    # patched per instance: the model's BN subclasses and their metadata survive
    assert case["classes"] == CLASSES and case["decoupled_metadata"] == [2, 0.25], case


@pytest.mark.parametrize("path", ["float64", "fused_float64"])
def test_two_ranks_compute_one_process_batch_norm_in_float64(cpu_ranks, path):
    """A float64 model: rounding only (measured 3e-16 to 7e-16, both paths)."""
    for rank in cpu_ranks:
        case = rank[path]
        _assert_matches(case, rel=1e-10)
        assert case["output_dtypes"] == ["torch.float64"]
        assert case["buffer_dtypes"] == ["torch.float64"]


def test_two_ranks_compute_one_process_batch_norm_in_float32(cpu_ranks):
    """A float32 model through the float64 path: float32 rounding of input and output
    (measured 2e-7 for output and input gradient, 4e-7 for parameter gradients)."""
    for rank in cpu_ranks:
        case = rank["float32"]
        _assert_matches(case, rel=2e-6)
        assert case["output_dtypes"] == case["buffer_dtypes"] == ["torch.float32"]


@pytest.mark.parametrize("path", ["bf16_autocast", "fused_bf16_autocast"])
def test_bf16_autocast_normalises_and_returns_float32(cpu_ranks, path):
    """Under bf16 autocast both paths return float32 (as Float32BatchNorm2d) and keep float32
    statistics; the BN matches one process to float32 rounding (measured 1e-7). Parameter
    gradients include the bf16 conv's, summed in bf16 over batches of different sizes
    (measured 3e-3)."""
    for rank in cpu_ranks:
        case = rank[path]
        _assert_matches(case, rel=2e-6, grads_rel=2e-2)
        assert case["output_dtypes"] == case["buffer_dtypes"] == ["torch.float32"]


def test_float64_path_reads_no_tensor_on_the_host(cpu_ranks):
    """Forward and backward of both BNs (momentum 0.1 and None) make no Python read of a tensor
    value (each would be a host-device sync on a GPU; the old code made three per step)."""
    for rank in cpu_ranks:
        for case in ("float64", "float32", "bf16_autocast"):
            assert rank[case]["host_reads"] == [], (case, rank[case]["host_reads"])


def test_compiled_model_is_one_graph_and_trains_as_eager(cpu_ranks):
    """``torch.compile`` (``aot_eager``, ``fullgraph``) over the synchronised network: one frame
    compiled for 3 training steps (no graph break at the BNs' all-reduces, no recompilation),
    outputs, input and parameter gradients and running statistics equal to the eager ones bit
    for bit on both ranks. (With ``torch.distributed.nn``'s all-reduce, which Dynamo refuses,
    fullgraph raised, and without it every frame holding a BN ran eager.)"""
    for rank in cpu_ranks:
        case = rank["compiled"]
        assert "error" not in case, case
        assert case["frames_compiled"] == 1, case
        assert case["equal"] == {"output": True, "input_grad": True, "param_grads": True,
                                 "buffers": True}, case
        assert case["batches_tracked"] == [3, 3], case


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (one per NCCL rank)")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_nccl_ranks_use_the_fused_kernels_and_compute_one_process_batch_norm(
        tmp_path, torchrun_worker):
    """The same comparison through PyTorch's fused SyncBatchNorm kernels on 2 GPUs. The float64
    case is rounding only; float32 and bf16 autocast go through float32 statistics (the
    kernels keep mean and 1/std, not sums of squares) against cuDNN's BN on the whole batch."""
    out = tmp_path / "cuda"
    for rank in torchrun_worker(WORKER, 2, "cuda", out, out=out):
        _assert_matches(rank["float64"], rel=1e-10)
        assert rank["float64"]["output_dtypes"] == ["torch.float64"]
        _assert_matches(rank["float32"], rel=1e-5)
        # the bf16 conv before the BN: cuDNN may pick another algorithm for another batch
        # size, and one bf16 step in a conv output moves that BN output by up to ~4e-3
        _assert_matches(rank["bf16_autocast"], rel=1e-2, grads_rel=2e-2)
        for case in ("float32", "bf16_autocast"):
            assert rank[case]["output_dtypes"] == ["torch.float32"], case
            assert rank[case]["buffer_dtypes"] == ["torch.float32"], case


def test_a_tensor_on_a_backend_that_cannot_reduce_it_is_refused(monkeypatch):
    """No silent fallback: a CPU tensor on an NCCL group (a model left off its GPU) is an error
    naming the mismatch; a group with a backend per device type finds gloo for CPU."""
    import torch.distributed as dist

    from binaryduo.models.layers import Float32BatchNorm2d
    from binaryduo.trainer.runtime import sync_batchnorm

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *_: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *_: "nccl")
    bn = Float32BatchNorm2d(2).train()
    sync_batchnorm.synchronize_batchnorm(bn)
    with pytest.raises(RuntimeError, match="cpu tensor on a 'nccl' process group"):
        bn(torch.ones(2, 2, 1, 1))
    monkeypatch.setattr(dist, "get_backend", lambda *_: "cpu:gloo,cuda:nccl")
    assert sync_batchnorm._backend_for("cpu") == "gloo"
    assert sync_batchnorm._backend_for("cuda") == "nccl"
