"""Decoupling a coupled (ternary) network into the equivalent binary one, and checking it.

``T(y) = 1/2 [B(y - 1/4) + B(y + 1/4)]`` holds for every real y (ties included), so a ternary
activation equals the mean of two binary activations of the same pre-activation with beta shifted
by -1/4 and +1/4. The decoupled skeleton built by the registry already has the target shapes and
marks, per layer, how a coupled parameter maps onto it (``DecoupledBatchNorm2d.shift``,
``QConv2d.input_copies``); ``decouple`` walks both models by module name and applies those rules
(docs/method.md §3):

- a ``DecoupledBatchNorm2d`` gets gamma, running mean and variance duplicated copy-major, and beta
  ``[beta - shift; beta + shift]``;
- a conv reading a decoupled activation gets ``[W/2, W/2]`` along its input axis (exact also for the
  binarized weights, because alpha = mean|W| halves with W);
- everything else is copied unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .layers import ActQuant, DecoupledBatchNorm2d, Float32BatchNorm2d, QConv2d
from .registry import build_from_config


def _coupled_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("decouple needs a model built by binaryduo.models.build "
                        f"(a {type(model).__name__} without a .config)")
    if config.variant != "coupled":
        raise ValueError(f"decouple needs a coupled model; {config.name!r} has variant "
                         f"{config.variant!r} (only ternary 'coupled' networks can be decoupled)")
    if config.act_levels != 2:
        raise ValueError(f"decouple needs ternary activations (2 levels); this coupled "
                         f"{config.name!r} has act_levels={config.act_levels}")
    return config


def _own_state(module: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(module.named_parameters(recurse=False))
    state.update(module.named_buffers(recurse=False))
    return state


@torch.no_grad()
def decouple(coupled: nn.Module) -> nn.Module:
    """Returns a new decoupled binary network equivalent to ``coupled`` (which is left untouched)."""
    config = _coupled_config(coupled)
    target = build_from_config(dataclasses.replace(config, variant="decoupled", act_levels=1))
    reference = next(coupled.parameters())
    target.to(device=reference.device, dtype=reference.dtype)

    sources = dict(coupled.named_modules())
    stateful_targets = set()
    for name, module in target.named_modules():
        state = _own_state(module)
        if not state:
            continue
        stateful_targets.add(name)
        source = sources.get(name)
        if source is None or type(source) not in _compatible_types(module):
            raise RuntimeError(f"decouple: no matching coupled layer for {name!r} "
                               f"({type(module).__name__})")
        source_state = _own_state(source)
        for key, tensor in state.items():
            value = _transform(module, key, source_state[key])
            if value.shape != tensor.shape:
                raise RuntimeError(f"decouple: {name}.{key} expects {tuple(tensor.shape)}, "
                                   f"rule gave {tuple(value.shape)}")
            tensor.copy_(value)
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(source_state[key].requires_grad)

    missing = {name for name, m in sources.items() if _own_state(m)} - stateful_targets
    if missing:
        raise RuntimeError(f"decouple: coupled layers without a decoupled counterpart: "
                           f"{', '.join(sorted(missing))}")
    target.train(coupled.training)
    for name, module in target.named_modules():
        if name in sources:
            module.train(sources[name].training)
    return target


def _compatible_types(module: nn.Module) -> tuple[type, ...]:
    if isinstance(module, DecoupledBatchNorm2d):
        return (Float32BatchNorm2d,)
    return (type(module),)


def _transform(module: nn.Module, key: str, value: torch.Tensor) -> torch.Tensor:
    if isinstance(module, DecoupledBatchNorm2d):
        if key == "num_batches_tracked":
            return value
        if key == "bias":
            return torch.cat([value + offset for offset in module.copy_offsets()])
        return torch.cat([value] * module.copies)
    if isinstance(module, QConv2d) and module.input_copies > 1 and key == "weight":
        return torch.cat([value / module.input_copies] * module.input_copies, dim=1)
    return value


# --------------------------------------------------------------------------------------------
# Verification: the stage boundary's guarantee.


@dataclass(frozen=True)
class DecouplingCheck:
    """How far a decoupled model is from its coupled source on one batch.

    ``max_abs_dlogit`` and ``changed_predictions`` verify the construction: a float64 copy of the
    coupled model against its own float64 decoupling, where the identity is exact up to round-off
    (~1e-12). ``parameter_deviation`` ties that to the model being checked: the largest difference
    between its state and the float64 decoupling cast to its dtype (0 for a model just made by
    ``decouple``; decoupling a float32 model rounds beta -+ 1/4 to float32, the same rounding).
    The ``native_*`` fields compare the two given models in their own dtype (or under autocast),
    where a pre-activation within an ulp of a threshold can flip (``y - 1/4 >= 1/2`` versus
    ``y >= 3/4``), and a bf16 convolution can round the same sum differently;
    ``native_activation_flips`` counts those activations out of ``activations_compared``.
    """

    mode: str
    samples: int
    max_abs_dlogit: float
    changed_predictions: int
    parameter_deviation: float
    native_dtype: str
    native_max_abs_dlogit: float
    native_changed_predictions: int
    native_activation_flips: int
    activations_compared: int

    @property
    def native_flip_fraction(self) -> float:
        """Flipped activations per compared activation, in the native comparison."""
        return self.native_activation_flips / max(self.activations_compared, 1)

    def passed(self, tolerance: float = 1e-9) -> bool:
        return (self.max_abs_dlogit <= tolerance and self.changed_predictions == 0
                and self.parameter_deviation == 0.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _run(model: nn.Module, batch: torch.Tensor, dtype: torch.dtype, train: bool,
         autocast: torch.dtype | None = None):
    """Forward pass of a copy of ``model`` in ``dtype`` (under ``autocast`` to that dtype if
    given); returns logits and ternary/binary outputs."""
    clone = copy.deepcopy(model).to(dtype)
    clone.train(train)
    for module in clone.modules():
        if isinstance(module, nn.Dropout):
            module.eval()  # dropout masks differ between the two networks; BN batch stats do not
    outputs: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(
        lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for name, module in clone.named_modules()
        if isinstance(module, ActQuant) and module.levels is not None]
    device = next(clone.parameters()).device
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.bfloat16,
                                             enabled=autocast is not None):
            logits = clone(batch.to(device=device, dtype=dtype)).to(dtype)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, outputs


def _parameter_deviation(reference: nn.Module, model: nn.Module) -> float:
    expected, actual = reference.state_dict(), model.state_dict()
    if expected.keys() != actual.keys() or any(
            expected[k].shape != actual[k].shape for k in expected):
        raise ValueError("the decoupled model does not have the shapes decoupling the coupled "
                         "model gives (was it built from a different config?)")
    deviation = 0.0
    for key, value in actual.items():
        if value.is_floating_point():
            target = expected[key].to(value.dtype)
            deviation = max(deviation, float((target - value).abs().max()))
        elif not torch.equal(expected[key], value):
            deviation = max(deviation, float("inf"))
    return deviation


def check_decoupling(coupled: nn.Module, decoupled: nn.Module, batch: torch.Tensor,
                     mode: str = "eval", autocast: torch.dtype | None = None) -> DecouplingCheck:
    """Verifies that ``decoupled`` is the exact binary equivalent of ``coupled`` on ``batch``.

    ``mode`` is ``"eval"`` (BN running statistics) or ``"train"`` (batch statistics, dropout off).
    ``autocast`` (e.g. ``torch.bfloat16``): the ``native_*`` comparison runs both models under
    autocast to that dtype, as mixed-precision training runs them (weights as they are).
    Neither model is modified.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    train = mode == "train"
    wide_coupled = copy.deepcopy(coupled).to(torch.float64)
    wide_reference = decouple(wide_coupled)
    deviation = _parameter_deviation(wide_reference, decoupled)  # also rejects foreign shapes
    wide_c, _ = _run(wide_coupled, batch, torch.float64, train)
    wide_d, _ = _run(wide_reference, batch, torch.float64, train)
    native = next(coupled.parameters()).dtype
    native_c, acts_c = _run(coupled, batch, native, train, autocast)
    native_d, acts_d = _run(decoupled, batch, native, train, autocast)

    flips = compared = 0
    for name, ternary in acts_c.items():
        pair = acts_d[name]
        half = pair.shape[1] // 2
        flips += int(((pair[:, :half] + pair[:, half:]) / 2 != ternary).sum())
        compared += ternary.numel()

    return DecouplingCheck(
        mode=mode,
        samples=int(batch.shape[0]),
        max_abs_dlogit=float((wide_c - wide_d).abs().max()),
        changed_predictions=int((wide_c.argmax(1) != wide_d.argmax(1)).sum()),
        parameter_deviation=deviation,
        native_dtype=str(native).removeprefix("torch.") + (
            f" (autocast {str(autocast).removeprefix('torch.')})" if autocast else ""),
        native_max_abs_dlogit=float((native_c - native_d).abs().max()),
        native_changed_predictions=int((native_c.argmax(1) != native_d.argmax(1)).sum()),
        native_activation_flips=flips,
        activations_compared=compared,
    )
