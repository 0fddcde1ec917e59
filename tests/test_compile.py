"""``torch.compile`` over the models (the recipe key ``compile``): every registry model traces
into one graph, and a compiled model computes what the eager one does.

The trainer compiles the engine's module in place (``engine.compile()``, i.e.
``nn.Module.compile``), so the module keeps its state-dict keys; the tests compile the same way.

Eager equality is checked with the ``aot_eager`` backend -- Dynamo's graph and AOTAutograd's joint
forward/backward, including the quantizers' custom backward passes, run by eager kernels -- and is
exact. The default ``inductor`` backend is not compared: compiling VGG-7 for CPU costs 20-65 s,
and it is not bit-exact: it reorders reductions, so alpha = mean|W| of a binary conv and the BN
statistics differ from eager by a few ulps (measured: alpha 0.79911757 vs 0.79911762), and in a
binary network such an ulp decides near-ties -- a max-pool window of equal-looking sums routes its
gradient to another element, a pre-activation on a threshold flips. Logits then agree to ~2e-7
but parameter gradients differ by up to ~50 % of their largest element, also in float64, where
the same graph under ``aot_eager`` is exact; no tolerance would mean anything.

These models run on one process. Their global-batch BN on several ranks (a functional all-reduce
in the graph) is compiled on 2 gloo ranks in tests/trainer/test_global_batch_norm.py.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from binaryduo import models

pytestmark = pytest.mark.slow

# Small instances: tracing costs per op, not per element, but the eager runs inside still compute.
SMALL = {"vgg7": {"width_mult": 0.25},
         "alexnet": {"width_mult": 0.125, "num_classes": 10},
         "resnet18": {"input_size": 32, "width_mult": 0.25, "num_classes": 10},
         "resnet18_sc": {"input_size": 32, "width_mult": 0.25, "num_classes": 10}}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _input(model, batch=2, seed=0):
    c = model.config
    return torch.randn(batch, c.in_channels, c.input_size, c.input_size,
                       generator=torch.Generator().manual_seed(seed))


#: Every registry model once, each quantizer kind in both network shapes: the ternary (coupled)
#: and binary (decoupled, = bnn's layers) activations in a plain chain and in a residual one. (All
#: eight pairs pass; this subset keeps the suite's time.)
GRAPH_CASES = [("vgg7", "coupled"), ("vgg7", "decoupled"), ("alexnet", "decoupled"),
               ("resnet18", "decoupled"), ("resnet18_sc", "coupled")]


def test_the_graph_cases_cover_the_registry():
    assert {name for name, _ in GRAPH_CASES} == set(models.names())


@pytest.mark.parametrize("name,variant", GRAPH_CASES)
def test_forward_is_one_graph(name, variant):
    """No graph break in the forward pass, as the training loop runs it (train mode, gradients,
    fp32) and as evaluation runs it under bf16 (eval mode, no_grad, autocast): between them,
    both branches of every quantizer's grad / autocast test (``binary_conv2d`` takes its custom
    Function with gradients, the plain composite without). ``decoupled`` also covers the
    binary activations and binary convs of ``bnn``."""
    torch.manual_seed(0)
    model = models.build(name, variant, **SMALL.get(name, {}))
    x = _input(model)
    for training, context in [(True, contextlib.nullcontext()),
                              (False, torch.autocast("cpu", dtype=torch.bfloat16))]:
        model.train(training)
        torch._dynamo.reset()
        with context, torch.set_grad_enabled(training):
            explanation = torch._dynamo.explain(model)(x)
        reasons = [b.reason for b in explanation.break_reasons]
        assert explanation.graph_break_count == 0, reasons
        assert explanation.graph_count == 1, reasons


def _clone_pair(variant):
    """A VGG-7 as the tiny recipe trains it (width 1/4, one channel, 32x32), and an eager copy.
    ``decoupled``: decoupled from a coupled model, as the fine-tuning stage starts."""
    torch.manual_seed(0)
    build = dict(width_mult=0.25, in_channels=1, num_classes=10)
    coupled = models.build("vgg7", "coupled", **build)
    model = models.decouple(coupled) if variant == "decoupled" else coupled
    return coupled, model, copy.deepcopy(model)


@pytest.mark.parametrize("variant", ["coupled", "decoupled"])
def test_compiled_vgg7_trains_and_evaluates_as_eager(variant):
    """Compiled in place, the state dict keeps its keys (no ``_orig_mod.``) and the decoupling
    check passes on the compiled module; then two training steps (forward, backward, SGD) and an
    evaluation pass, compiled vs eager: logits, every gradient, every parameter and BN buffer
    bit for bit."""
    coupled, compiled, eager = _clone_pair(variant)
    compiled.compile(backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    if variant == "decoupled":  # where the runner checks it: the engine's module, compiled
        check = models.check_decoupling(coupled, compiled, _input(compiled, batch=8, seed=9))
        assert check.passed() and check.native_activation_flips == 0, check
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in
                  (compiled, eager)]
    for step in range(2):
        x = _input(compiled, batch=8, seed=step)
        labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(step))
        logits = []
        for model, optimizer in zip((compiled, eager), optimizers):
            model.train()
            optimizer.zero_grad()
            out = model(x)
            F.cross_entropy(out, labels).backward()
            logits.append(out.detach())
        assert torch.equal(*logits), f"step {step}: logits differ"
        for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
            assert torch.equal(a.grad, b.grad), f"step {step}: gradient of {name} differs"
        for optimizer in optimizers:
            optimizer.step()
    for (name, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after training"
    x = _input(compiled, batch=8, seed=9)
    with torch.no_grad():
        assert torch.equal(compiled.eval()(x), eager.eval()(x))
