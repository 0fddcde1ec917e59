"""Checks an exported IR against the PyTorch model it came from, and proves its binary layers run
OpenVINO's bit-packed kernel.

Two things are compared on the same images: the IR's logits (CPU plugin, inference precision forced
to float32) against the PyTorch model run in float64 (the float64 run is the exact reference: the
IR's binary layers are exact, and a coupled model equals its decoupling exactly in float64), and
the compiled model's runtime graph: every binary convolution of the PyTorch model must appear in a
runtime node whose ``layerType`` is BinaryConvolution (a layer that fell back to a float
Convolution, or vanished, fails the check).
"""
from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.properties.hint as hints
import torch
from torch import nn

from binaryduo.models.layers import QConv2d

#: The CPU plugin's runtime layer type of a bit-packed xnor-popcount convolution.
BINARY_LAYER_TYPE = "BinaryConvolution"


@dataclass
class VerificationReport:
    """What ``verify`` measured; ``passed`` with a one-line ``reason`` when it did not."""

    samples: int
    identical_predictions: int
    max_abs_dlogit: float
    #: the optional bound on max_abs_dlogit that ``passed`` also required (None: reported only)
    max_abs_dlogit_bound: float | None
    reference_dtype: str
    inference_precision: str
    expected_binary_kernels: int
    binary_kernels: int
    #: module name -> primitiveType of the runtime BinaryConvolution it runs in
    binary_layers: dict[str, str]
    binary_primitive_types: list[str]
    #: binary convolutions of the PyTorch model that run in no runtime BinaryConvolution
    missing_binary_layers: list[str]
    #: runtime layerType -> count (the whole compiled graph)
    runtime_layer_types: dict[str, int]
    passed: bool
    reason: str
    #: with labels: top-1 (%) of the IR and of the PyTorch reference on the same images
    ir_top1: float | None = None
    reference_top1: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _rt(op, key: str) -> str:
    info = op.get_rt_info()
    return info[key].astype(str) if key in info else ""


def compile_for_verification(ir: ov.Model | str | Path, core: ov.Core | None = None,
                             batch: int | None = None) -> ov.CompiledModel:
    """CPU compilation with float32 inference precision (no bf16/fp16 rounding of float layers);
    ``batch`` reshapes a copy of the model to that batch size first."""
    core = core or ov.Core()
    model = core.read_model(str(ir)) if isinstance(ir, (str, Path)) else ir.clone()
    if batch is not None:
        shape = list(model.input(0).get_shape())
        if shape[0] != batch:
            model.reshape([batch, *shape[1:]])
    return core.compile_model(model, "CPU", {hints.inference_precision: ov.Type.f32})


def run_compiled(compiled: ov.CompiledModel, images: np.ndarray) -> np.ndarray:
    """Logits of ``images``, in chunks of the compiled batch size (the last one zero-padded)."""
    batch = int(compiled.input(0).get_shape()[0])
    request = compiled.create_infer_request()
    outputs = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]),
                                                    chunk.dtype)])
        result = request.infer({0: chunk})
        outputs.append(np.array(result[compiled.output(0)])[:min(batch, len(images) - start)])
    return np.concatenate(outputs)


def binary_layer_names(torch_model: nn.Module) -> list[str]:
    """Module names of the model's binary-weight convolutions (those the IR must run binary)."""
    return [name for name, module in torch_model.named_modules()
            if isinstance(module, QConv2d) and module.weight_bits == 1]


def runtime_binary_layers(compiled: ov.CompiledModel) -> tuple[dict[str, str], int, Counter]:
    """(original layer name -> primitiveType for every runtime BinaryConvolution, their count,
    layerType counts of the whole runtime graph)."""
    layers: dict[str, str] = {}
    kernels = 0
    types: Counter = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        layer_type = _rt(op, "layerType")
        types[layer_type] += 1
        if layer_type != BINARY_LAYER_TYPE:
            continue
        kernels += 1
        primitive = _rt(op, "primitiveType")
        for original in filter(None, _rt(op, "originalLayersNames").split(",")):
            layers[original] = primitive
    return layers, kernels, types


def reference_logits(torch_model: nn.Module, images: torch.Tensor,
                     chunk: int = 256) -> torch.Tensor:
    """The model's eval forward in float64 on the CPU (a copy; the model is left untouched), in
    chunks of ``chunk`` images (a whole test set at once would hold every activation)."""
    reference = copy.deepcopy(torch_model).to(device="cpu", dtype=torch.float64).eval()
    with torch.no_grad():
        return torch.cat([reference(part.to(device="cpu", dtype=torch.float64))
                          for part in images.split(chunk)])


def verify(ir_or_compiled: ov.Model | ov.CompiledModel | str | Path, torch_model: nn.Module,
           images, *, max_abs_dlogit: float | None = None, labels=None,
           core: ov.Core | None = None) -> VerificationReport:
    """Runs the IR (an ``ov.Model``, a path to its ``.xml``, or a compiled model) and the PyTorch
    model on ``images`` (N, C, H, W) and reports identical predictions, max |logit difference|
    and the binary kernels of the runtime graph. An uncompiled IR is compiled on the CPU with
    float32 inference precision at the batch size of ``images``; a compiled one is used as it is
    (chunks of its batch size). ``max_abs_dlogit``: also require the difference to stay below it.
    ``labels``: also report both top-1 accuracies.
    """
    images = torch.as_tensor(images)
    if isinstance(ir_or_compiled, ov.CompiledModel):
        compiled = ir_or_compiled
    else:
        compiled = compile_for_verification(ir_or_compiled, core, batch=len(images))
    precision = compiled.get_property(hints.inference_precision)
    precision = precision.get_type_name() if isinstance(precision, ov.Type) else str(precision)
    logits = run_compiled(compiled, images.to(torch.float32).cpu().numpy()).astype(np.float64)
    reference = reference_logits(torch_model, images).numpy()
    if logits.shape != reference.shape:
        raise ValueError(f"the IR gives logits of shape {logits.shape}, the PyTorch model "
                         f"{reference.shape}: not an export of this model")

    identical = int((logits.argmax(1) == reference.argmax(1)).sum())
    top1 = {}
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        top1 = {"ir_top1": 100.0 * float((logits.argmax(1) == labels).mean()),
                "reference_top1": 100.0 * float((reference.argmax(1) == labels).mean())}
    max_dlogit = float(np.abs(logits - reference).max())
    expected = binary_layer_names(torch_model)
    layers, kernels, types = runtime_binary_layers(compiled)
    missing = [name for name in expected if name not in layers]

    if identical != len(images):
        reason = (f"{len(images) - identical} of {len(images)} predictions differ from PyTorch "
                  f"(max |dlogit| {max_dlogit:.3g})")
    elif missing:
        reason = (f"{len(missing)} of {len(expected)} binary convolutions do not run as "
                  f"{BINARY_LAYER_TYPE}: {', '.join(missing)}")
    elif kernels != len(expected):
        reason = (f"{kernels} runtime {BINARY_LAYER_TYPE} kernels for {len(expected)} binary "
                  "convolutions")
    elif max_abs_dlogit is not None and not max_dlogit <= max_abs_dlogit:
        reason = f"max |dlogit| {max_dlogit:.3g} exceeds the bound {max_abs_dlogit:.3g}"
    else:
        reason = ""
    return VerificationReport(
        samples=len(images), identical_predictions=identical, max_abs_dlogit=max_dlogit,
        max_abs_dlogit_bound=max_abs_dlogit, reference_dtype="float64",
        inference_precision=precision, expected_binary_kernels=len(expected),
        binary_kernels=kernels, binary_layers={name: layers[name] for name in expected
                                                if name in layers},
        binary_primitive_types=sorted(set(layers.values())), missing_binary_layers=missing,
        runtime_layer_types=dict(sorted(types.items())), passed=not reason, reason=reason, **top1)
