"""Worker for test_global_batch_norm, run under torchrun. Writes ``<out>.<rank>.json``.

``cpu OUT`` (gloo) and ``cuda OUT`` (NCCL, one GPU per rank): a Conv -> Float32BatchNorm2d
(momentum None, a cumulative average) -> DecoupledBatchNorm2d (momentum 0.1) network, 3 training
steps on rank batches of 3 and 5 images, synchronised with ``synchronize_batchnorm``, against
the same network without it on the concatenated batch of 8, in this process (every rank draws
every rank's inputs from seeded generators). Each rank's loss is ``sum(y * upstream)``, so the
global loss is the sum of the ranks' and the sum over ranks of a parameter's gradient is the
reference gradient. (DDP and DeepSpeed average: with each rank's loss a mean over its equal-size
batch, the average is the gradient of the global-batch mean loss -- the same statement.)

Reported per case: the largest difference relative to the reference's largest magnitude, for
this rank's output and input gradient, the parameter gradients summed over ranks, the running
statistics; ``num_batches_tracked``, dtypes, whether the BN classes and their metadata survived,
and (CPU) the host reads of tensor values in the float64 path.

On CPU the network is also compiled (``compiled``: ``torch.compile``, Dynamo and AOTAutograd with
the ``aot_eager`` backend, as the trainer compiles the engine's module with ``module.compile()``)
and trained against the eager synchronised network: how many frames Dynamo compiled over 3 steps
(a counting backend, ``fullgraph``: 1 is one graph, no break, no recompilation), and whether
output, input gradient, parameter gradients and BN buffers are equal bit for bit (``aot_eager``
runs the traced graph on eager kernels; inductor would reorder the sums).

On CPU the fused path (``_fused_global_batch_norm``: PyTorch's SyncBatchNorm autograd function
without its empty-rank mask) also runs, on :func:`emulated_fused_kernels`: float64 CPU stand-ins
for the five CUDA-only ``torch.batch_norm_*`` kernels. That exercises our wrapper (casts,
autocast, momentum, running statistics, argument order) and the gloo branch; the CUDA kernels
themselves and the NCCL branch are what ``cuda`` checks on GPUs.
"""
import contextlib
import copy
import json
import os
import sys
import types

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from binaryduo.models.layers import DecoupledBatchNorm2d, Float32BatchNorm2d
from binaryduo.trainer.runtime import sync_batchnorm
from binaryduo.trainer.runtime.sync_batchnorm import synchronize_batchnorm

BATCHES = (3, 5)  # per rank: unequal, so the global count must come from the collective
STEPS = 3
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}


class CountHostReads(TorchFunctionMode):
    """Python-level reads of tensor values (each a host-device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def emulated_fused_kernels():
    """CPU float64 versions of the CUDA kernels ``torch.nn.modules._functions.SyncBatchNorm``
    calls (the formulas of aten/src/ATen/native/cuda/Normalization.cuh), patched into ``torch``
    for the block; outputs in the dtypes the CUDA kernels give for float32/float64 inputs."""
    def dims(x):
        return [0] + list(range(2, x.dim()))

    def col(t, x):
        return t.double().view([1, -1] + [1] * (x.dim() - 2))

    def stats(x, eps):
        w = x.double()
        return (w.mean(dims(x)).to(x.dtype),
                torch.rsqrt(w.var(dims(x), unbiased=False) + eps).to(x.dtype))

    def gather(x, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts):
        c = counts.double().view(-1, 1)
        n = c.sum()
        m, v = mean_all.double(), invstd_all.double().pow(-2) - eps  # per-rank biased var
        mean = (c * m).sum(0) / n
        var = (c * (v + (m - mean) ** 2)).sum(0) / n
        for buffer, value in ((running_mean, mean), (running_var, var * n / (n - 1))):
            if buffer is not None:
                buffer.copy_(momentum * value + (1 - momentum) * buffer.double())
        return mean.to(mean_all.dtype), torch.rsqrt(var + eps).to(mean_all.dtype)

    def elemt(x, weight, bias, mean, invstd, eps):
        y = (x.double() - col(mean, x)) * col(invstd, x)
        y = y if weight is None else y * col(weight, x)
        return (y if bias is None else y + col(bias, x)).to(x.dtype)

    def backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
        sum_dy = dy.double().sum(dims(x))
        sum_dy_xmu = (dy.double() * (x.double() - col(mean, x))).sum(dims(x))
        dtype = mean.dtype if weight is None else weight.dtype
        return (sum_dy.to(mean.dtype), sum_dy_xmu.to(mean.dtype),
                (sum_dy_xmu * invstd.double()).to(dtype), sum_dy.to(dtype))

    def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        n = count.double().sum()
        inv = col(invstd, x)
        g = (dy.double() - col(sum_dy, x) / n
             - (x.double() - col(mean, x)) * inv * inv * col(sum_dy_xmu, x) / n) * inv
        return (g if weight is None else g * col(weight, x)).to(x.dtype)

    names = {"batch_norm_stats": stats, "batch_norm_gather_stats_with_counts": gather,
             "batch_norm_elemt": elemt, "batch_norm_backward_reduce": backward_reduce,
             "batch_norm_backward_elemt": backward_elemt}
    saved = {name: getattr(torch, name) for name in names}
    try:
        for name, function in names.items():
            setattr(torch, name, function)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch, name, function)


def make_model(dtype: torch.dtype, device: torch.device) -> torch.nn.Sequential:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), Float32BatchNorm2d(4),
                              torch.nn.Tanh(), DecoupledBatchNorm2d(4, copies=2, shift=0.25))
    net[1].momentum = None  # the cumulative average: 1/num_batches_tracked
    with torch.no_grad():
        for bn in (net[1], net[3]):  # not the identity the defaults give: gradients differ
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.to(device=device, dtype=dtype).train()


def inputs(rank: int, step: int, dtype, device):
    """Rank ``rank``'s images and upstream gradient at ``step`` (the same on every process)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCHES[rank], 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 0.5
    upstream = torch.randn(BATCHES[rank], 4, 6, 6, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), upstream.to(device)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_case(dtype, device, *, autocast: bool, fused: bool = False) -> dict:
    """One comparison (see the module docstring)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = make_model(dtype, device)
    net = copy.deepcopy(reference)
    if fused:  # the CUDA path's wrapper, on CPU (with emulated_fused_kernels)
        for module in (net[1], net[3]):
            module.forward = types.MethodType(sync_batchnorm._fused_global_batch_norm, module)
    else:
        assert synchronize_batchnorm(net) == 2
    reads = CountHostReads()
    out_error = grad_error = 0.0
    out_dtypes = set()
    for step in range(STEPS):
        batches = [inputs(r, step, dtype, device) for r in range(world)]
        x = batches[rank][0].clone().requires_grad_()
        whole = torch.cat([b[0] for b in batches]).requires_grad_()
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            with reads if not fused else contextlib.nullcontext():
                y = net(x)
                (y * batches[rank][1].to(y.dtype)).sum().backward()
            y_ref = reference(whole)
            (y_ref * torch.cat([b[1] for b in batches]).to(y_ref.dtype)).sum().backward()
        start = sum(BATCHES[:rank])
        out_error = max(out_error, relative(y, y_ref[start:start + BATCHES[rank]]))
        grad_error = max(grad_error, relative(x.grad, whole.grad[start:start + BATCHES[rank]]))
        out_dtypes.add(str(y.dtype))
    # relative to the largest reference gradient: the conv bias's is zero up to rounding (BN
    # removes a per-channel constant), so its own scale would measure only round-off
    scale = max(float(p.grad.abs().max()) for p in reference.parameters())
    param_error = 0.0
    for p, p_ref in zip(net.parameters(), reference.parameters()):
        summed = p.grad.clone()
        dist.all_reduce(summed)  # what the engine's gradient all-reduce sums (then averages)
        param_error = max(param_error, float((summed - p_ref.grad).abs().max()) / scale)
    bns, ref_bns = (net[1], net[3]), (reference[1], reference[3])
    return {
        "output": out_error, "input_grad": grad_error, "param_grads": param_error,
        "running_mean": max(relative(a.running_mean, b.running_mean)
                            for a, b in zip(bns, ref_bns)),
        "running_var": max(relative(a.running_var, b.running_var) for a, b in zip(bns, ref_bns)),
        "batches_tracked": [int(bn.num_batches_tracked) for bn in bns],
        "output_dtypes": sorted(out_dtypes),
        "buffer_dtypes": sorted({str(t.dtype) for bn in bns for t in
                                 (bn.running_mean, bn.running_var, bn.weight)}),
        "classes": [type(bn).__name__ for bn in bns],
        "decoupled_metadata": [net[3].copies, net[3].shift],
        "host_reads": reads.calls,
    }


def compile_case() -> dict:
    """The network compiled vs eager, both synchronised (see the module docstring): float32,
    3 training steps. ``fullgraph``: a frame Dynamo cannot trace raises (reported as ``error``)
    instead of running eager. (``torch._dynamo.explain`` is no witness here: Dynamo skips a frame
    whose tracing raised without counting a break, and with ``torch.distributed.nn``'s all-reduce,
    which raises under Dynamo, explain reported 1 graph and 0 breaks -- 4 ops of
    ``_blend_cumulative`` -- while every frame holding a BN ran eager.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    rank = dist.get_rank()
    eager = make_model(torch.float32, torch.device("cpu"))
    compiled = copy.deepcopy(eager)
    synchronize_batchnorm(eager)
    synchronize_batchnorm(compiled)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # aot_eager: eager kernels, bit for bit
    compiled.compile(backend=counter, fullgraph=True)
    equal = {"output": True, "input_grad": True, "param_grads": True}
    try:
        for step in range(STEPS):
            x, upstream = inputs(rank, step, torch.float32, torch.device("cpu"))
            results = []
            for model in (compiled, eager):
                model.zero_grad()
                xi = x.clone().requires_grad_()
                y = model(xi)
                (y * upstream.float()).sum().backward()
                results.append((y.detach(), xi.grad, [p.grad for p in model.parameters()]))
            (y_c, g_c, p_c), (y_e, g_e, p_e) = results
            equal["output"] &= torch.equal(y_c, y_e)
            equal["input_grad"] &= torch.equal(g_c, g_e)
            equal["param_grads"] &= all(torch.equal(a, b) for a, b in zip(p_c, p_e))
    except Exception as error:  # noqa: BLE001 -- reported; both ranks fail alike (same graph)
        return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"}
    finally:
        torch._dynamo.reset()
    equal["buffers"] = all(torch.equal(a, b) for a, b in zip(compiled.buffers(), eager.buffers()))
    return {"frames_compiled": counter.frame_count, "ops": counter.op_count, "equal": equal,
            "batches_tracked": [int(bn.num_batches_tracked) for bn in (compiled[1], compiled[3])]}


def main(kind: str, out: str) -> None:
    if kind == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        # TF32 convolutions would round the BN's inputs to 10 bits, differently for the batch of
        # 8 and the batches of 3 and 5 when cuDNN picks other algorithms; float32 is compared
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        result = {
            "float64": run_case(torch.float64, device, autocast=False),
            "float32": run_case(torch.float32, device, autocast=False),
            "bf16_autocast": run_case(torch.float32, device, autocast=True),
        }
        if kind == "cpu":
            with emulated_fused_kernels():
                result["fused_float64"] = run_case(torch.float64, device, autocast=False,
                                                   fused=True)
                result["fused_bf16_autocast"] = run_case(torch.float32, device, autocast=True,
                                                         fused=True)
            result["compiled"] = compile_case()
        with open(f"{out}.{dist.get_rank()}.json", "w") as handle:
            json.dump(result, handle)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
