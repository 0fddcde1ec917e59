"""OpenVINO graph pieces of an exported binary network (the algebra is in ``openvino_ir``).

A tensor on its way through the exporter is one of two things:

- ``Affine``: an OpenVINO output ``v`` plus per-channel float64 ``scale`` and ``shift`` such that
  the PyTorch tensor is ``scale * v + shift``. A binary convolution yields its xnor-popcount
  count ``P`` with ``scale = alpha/2`` and ``shift = alpha/2 * S``; a BatchNorm only updates
  ``scale`` and ``shift``, in float64, and nothing is computed in the graph until a consumer needs
  a float tensor (``materialize``) or a {0, 1} one (``binarize``, which folds the whole affine map
  into the FakeQuantize threshold).
- ``Bits``: a FakeQuantize(levels=2) output of {0, 1} values, the input of a BinaryConvolution,
  with its channel count rounded up to a multiple of 8 (``BIT_CHANNEL_MULTIPLE``).

What OpenVINO 2026.4.1's CPU plugin needs, as measured (the IR targets that plugin):

- Its BinaryConvolution reads a ``u1`` weight constant least-significant bit first (element ``i``
  of the flattened OIHW filters is bit ``i % 8`` of byte ``i // 8``), whereas
  ``opset.constant(..., dtype=u1)`` packs most-significant bit first (and the core's reference
  implementation reads it so): ``pack_filter_bits`` writes the bytes itself (pinned by a test).
- Binarized tensors whose channel count is not a multiple of 8 give wrong counts (7, 9, 33
  channels: wrong; 8, 16, 24, ... 256: exact), so ``binarize`` pads the channel axis with
  always-0 channels and ``binary_conv`` gives those input channels weight bit 0 (s = -1): a zero
  activation adds nothing to ``z``, exactly like a zero-padded border tap (the model tests fail
  with ``BIT_CHANNEL_MULTIPLE = 1``).
- Static shapes: its BinaryConvolution refuses dynamic ones ("Doesn't support op with dynamic
  shapes"), so the batch size is fixed at export (``ov.Model.reshape`` before compiling changes it).
- AvgPool-1, not the opset16 AvgPool (which crashes compilation). A FakeQuantize(levels=2)
  output becomes a bit-packed buffer that only a BinaryConvolution reads: as a model output, or
  into a float Convolution, it crashed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset1 as ops_v1
import openvino.opset16 as ops

#: Channels of a binarized tensor are padded up to a multiple of this (see the module docstring).
BIT_CHANNEL_MULTIPLE = 8
#: pad_value of every BinaryConvolution: the +-1 image of a {0, 1} zero (bit 0). 0.0 would be the
#: naive copy of PyTorch's zero padding; the CPU plugin then leaves the padded taps out of the sum.
ZERO_PAD_VALUE = -1.0
#: Thresholds beyond any value a layer can produce (keeps them finite in float32).
_THRESHOLD_LIMIT = 2.0**100
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Affine:
    """The PyTorch tensor ``scale * value + shift`` (per channel, axis 1), ``value`` in the graph.

    ``integer_valued``: ``value`` holds exact integers (an xnor-popcount count, or a max of them).
    """

    value: ov.Output
    scale: np.ndarray
    shift: np.ndarray
    integer_valued: bool

    @classmethod
    def identity(cls, value: ov.Output, integer_valued: bool = False) -> Affine:
        channels = value.get_partial_shape()[1].get_length()
        return cls(value, np.ones(channels), np.zeros(channels), integer_valued)

    @property
    def channels(self) -> int:
        return len(self.scale)

    def then(self, scale: np.ndarray, shift: np.ndarray) -> Affine:
        """``scale * self + shift`` (a folded BatchNorm), composed in float64."""
        return Affine(self.value, scale * self.scale, scale * self.shift + shift,
                      self.integer_valued)


@dataclass
class Bits:
    """A {0, 1} tensor of ``channels`` real channels, padded to ``padded_channels``."""

    value: ov.Output
    channels: int
    padded_channels: int


def _per_channel(values: np.ndarray) -> ov.Output:
    return ops.constant(np.asarray(values, dtype=np.float32).reshape(1, -1, 1, 1)).output(0)


def materialize(tensor: Affine, name: str | None = None) -> ov.Output:
    """The float32 tensor ``scale * value + shift`` (no op where the map is the identity)."""
    out = tensor.value
    if not np.all(tensor.scale == 1.0):
        out = ops.multiply(out, _per_channel(tensor.scale)).output(0)
    if not np.all(tensor.shift == 0.0):
        out = ops.add(out, _per_channel(tensor.shift)).output(0)
    if name is not None and out is not tensor.value:
        out.get_node().set_friendly_name(name)
    return out


def _float32_at_least(values: np.ndarray) -> np.ndarray:
    """The smallest float32 >= each float64 value."""
    rounded = values.astype(np.float32)
    low = rounded.astype(np.float64) < values
    rounded[low] = np.nextafter(rounded[low], np.float32(np.inf))
    return rounded


def _float32_at_most(values: np.ndarray) -> np.ndarray:
    """The largest float32 <= each float64 value."""
    rounded = values.astype(np.float32)
    high = rounded.astype(np.float64) > values
    rounded[high] = np.nextafter(rounded[high], np.float32(-np.inf))
    return rounded


def binarization_thresholds(scale: np.ndarray, shift: np.ndarray, integer_valued: bool):
    """Per-channel FakeQuantize(levels=2) parameters ``(threshold, output_low, output_high)`` that
    output 1 exactly where ``scale * v + shift >= 1/2`` for every float32 ``v`` (FakeQuantize gives
    ``output_low`` for ``v <= threshold`` and ``output_high`` for ``v > threshold``).

    With ``t = (1/2 - shift) / scale`` the unit fires where ``v >= t`` (scale > 0) or ``v <= t``
    (scale < 0, output levels swapped); the tie ``scale * v + shift == 1/2`` fires. Integer ``v``:
    the threshold is the half-integer ``ceil(t) - 1/2`` (or ``floor(t) + 1/2``), which no count
    can equal. Float ``v``: the threshold is the float32 just below the smallest float32 >= t (or
    the largest float32 <= t), so ``v > threshold`` is ``v >= t`` for float32 ``v``; for ``t = 1/2``
    that is 0.49999997. ``scale == 0`` is a constant unit: it always sees ``v > -FLT_MAX``.
    """
    scale = np.asarray(scale, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    rising, falling, flat = scale > 0, scale < 0, scale == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip((0.5 - shift) / np.where(flat, 1.0, scale), -_THRESHOLD_LIMIT, _THRESHOLD_LIMIT)
    threshold = np.empty(len(scale), dtype=np.float32)
    if integer_valued:
        threshold[rising] = np.ceil(t[rising]) - 0.5
        threshold[falling] = np.floor(t[falling]) + 0.5
    else:
        threshold[rising] = np.nextafter(_float32_at_least(t[rising]), np.float32(-np.inf))
        threshold[falling] = _float32_at_most(t[falling])
    threshold[flat] = -_FLOAT32_MAX
    output_low = np.where(falling, 1.0, 0.0).astype(np.float32)
    output_high = np.where(falling, 0.0, 1.0).astype(np.float32)
    constant_on = shift >= 0.5
    output_high[flat] = np.where(constant_on[flat], 1.0, 0.0)
    output_low[flat] = 1.0 - output_high[flat]
    return threshold, output_low, output_high


def _round_up(channels: int) -> int:
    return -(-channels // BIT_CHANNEL_MULTIPLE) * BIT_CHANNEL_MULTIPLE


def binarize(tensor: Affine, name: str) -> Bits:
    """FakeQuantize(levels=2) of ``scale * value + shift`` to {0, 1}: 1 where it is >= 1/2."""
    threshold, low, high = binarization_thresholds(tensor.scale, tensor.shift,
                                                   tensor.integer_valued)
    value, channels = tensor.value, tensor.channels
    padded = _round_up(channels)
    if padded != channels:
        # always-0 channels: value 0 against threshold 1/2 with levels (0, 1)
        value = ops.pad(value, np.array([0, 0, 0, 0], np.int64),
                        np.array([0, padded - channels, 0, 0], np.int64), "constant",
                        np.float32(0.0)).output(0)
        extra = padded - channels
        threshold = np.concatenate([threshold, np.full(extra, 0.5, np.float32)])
        low = np.concatenate([low, np.zeros(extra, np.float32)])
        high = np.concatenate([high, np.ones(extra, np.float32)])
    # input_low == input_high: the CPU plugin's binarization form of FakeQuantize. Four separate
    # constants: the plugin fuses a FakeQuantize into the preceding convolution only when none of
    # its parameter constants is shared.
    quantized = ops.fake_quantize(value, _per_channel(threshold), _per_channel(threshold),
                                  _per_channel(low), _per_channel(high), 2, name=name)
    return Bits(quantized.output(0), channels, padded)


def pack_filter_bits(bits: np.ndarray) -> ov.Output:
    """A ``u1`` constant of boolean filters (OIHW), packed least-significant bit first."""
    tensor = ov.Tensor(ov.Type.u1, ov.Shape(list(bits.shape)))
    tensor.data[:] = np.packbits(bits.reshape(-1), bitorder="little")
    return ov.op.Constant(tensor, shared_memory=False).output(0)


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


def binary_conv(bits: Bits, weight: np.ndarray, alpha: np.ndarray, geometry: ConvGeometry,
                name: str) -> Affine:
    """``conv(a, alpha * s(W))`` for {0, 1} activations ``a``, as ``alpha/2 * (P + S)``.

    ``P`` is the BinaryConvolution (xnor-popcount) of ``x = 2a - 1`` with ``s``, padding
    ``ZERO_PAD_VALUE``; ``S`` is the sum of ``s`` over each filter, including the always-0 padded
    input channels, which get ``s = -1``. ``weight``: the latent float weights (float64);
    ``alpha``: the scale per output channel (the model's ``weight_scale``, repeated when it is
    one per layer).
    """
    out_channels, in_channels = weight.shape[:2]
    if in_channels != bits.channels:
        raise ValueError(f"{name}: {in_channels} input channels, the activation has "
                         f"{bits.channels}")
    filter_bits = np.zeros((out_channels, bits.padded_channels, *weight.shape[2:]), dtype=bool)
    filter_bits[:, :in_channels] = weight >= 0  # s(0) = +1
    signs_sum = (2.0 * filter_bits - 1.0).sum(axis=(1, 2, 3))
    count = ops.binary_convolution(
        bits.value, pack_filter_bits(filter_bits), list(geometry.stride),
        list(geometry.padding), list(geometry.padding), list(geometry.dilation), "xnor-popcount",
        ZERO_PAD_VALUE, name=name)
    return Affine(count.output(0), alpha / 2, alpha / 2 * signs_sum, integer_valued=True)


def float_conv(value: ov.Output, weight: np.ndarray, bias: np.ndarray | None,
               geometry: ConvGeometry, name: str) -> ov.Output:
    out = ops.convolution(value, ops.constant(weight.astype(np.float32)), list(geometry.stride),
                          list(geometry.padding), list(geometry.padding), list(geometry.dilation),
                          name=name).output(0)
    if bias is not None:
        out = ops.add(out, _per_channel(bias), name=f"{name}.bias").output(0)
    return out


def max_pool(tensor: Affine, kernel, stride, padding, name: str) -> Affine:
    """Max pooling of ``scale * v + shift``: pools ``v`` where every scale is >= 0 (monotone),
    else materializes first."""
    if np.any(tensor.scale < 0):
        tensor = Affine.identity(materialize(tensor))
    pooled = ops.max_pool(tensor.value, list(stride), [1, 1], list(padding), list(padding),
                          list(kernel), "floor", name=name).output(0)
    return Affine(pooled, tensor.scale, tensor.shift, tensor.integer_valued)


def avg_pool(value: ov.Output, kernel, stride, padding, count_include_pad: bool,
             name: str) -> ov.Output:
    # AvgPool-1: the opset16 AvgPool crashes OpenVINO 2026.4.1's CPU plugin at compile time
    return ops_v1.avg_pool(value, list(stride), list(padding), list(padding), list(kernel),
                           exclude_pad=not count_include_pad, rounding_type="floor",
                           name=name).output(0)


def replicate(tensor: Affine, copies: int, name: str) -> Affine:
    """Copy-major ``[z; z]`` on the channel axis, the affine map repeated with it."""
    value = ops.concat([tensor.value] * copies, axis=1, name=name).output(0)
    return Affine(value, np.tile(tensor.scale, copies), np.tile(tensor.shift, copies),
                  tensor.integer_valued)


def mean_of_copies(value: ov.Output, copies: int, name: str) -> ov.Output:
    parts = ops.split(value, np.int64(1), copies).outputs()
    total = parts[0]
    for part in parts[1:]:
        total = ops.add(total, part).output(0)
    return ops.multiply(total, np.float32(1.0 / copies), name=name).output(0)


def zero_pad_channels(value: ov.Output, out_channels: int, name: str) -> ov.Output:
    missing = out_channels - value.get_partial_shape()[1].get_length()
    return ops.pad(value, np.array([0, 0, 0, 0], np.int64), np.array([0, missing, 0, 0], np.int64),
                   "constant", np.float32(0.0), name=name).output(0)
