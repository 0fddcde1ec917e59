"""Model registry: ``build(name, variant, **options)`` and ``names()``.

Architectures register a small builder function with the options they accept; everything a
builder needs is resolved once into a frozen ``ModelConfig``, which the model keeps (``model.config``)
so that ``decouple`` and the cost report can rebuild or describe it.

Variants (docs/method.md §2):

- ``fp``        full-precision reference: baseline widths, FP weights, ReLU activations;
- ``bnn``       baseline widths, binary activations {0, 1};
- ``coupled``   ternary activations {0, 1/2, 1}, widths cut by about 1/sqrt(2);
- ``decoupled`` the binary network ``decouple`` produces from ``coupled`` (doubled inputs).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .quantizers import DEFAULT_SWISHSIGN_BETA, STE, levels_for_bits

VARIANTS = ("fp", "bnn", "coupled", "decoupled")
#: Activation levels each variant uses unless overridden (None = full precision).
DEFAULT_LEVELS = {"fp": None, "bnn": 1, "coupled": 2, "decoupled": 1}
#: ``act_bits`` value meaning "full precision" (the clip(y, 0, 1) limit of the staircase).
FULL_PRECISION_BITS = 32


@dataclass(frozen=True)
class ModelConfig:
    """Every resolved choice a builder needs; stored on the model as ``model.config``."""

    name: str
    variant: str
    num_classes: int
    in_channels: int
    input_size: int
    #: 1: alpha * sign(W) in every conv except the first, the classifier and 1x1 shortcuts.
    weight_bits: int
    #: Non-zero activation levels (1 binary, 2 ternary, 2^k - 1 for k bits); None = full precision.
    act_levels: int | None
    ste: STE
    swishsign_beta: float
    #: One alpha per output channel instead of per layer (a deviation from the paper).
    per_channel_scale: bool
    #: Bound on latent binary weights, applied after each optimizer step; None = off (the paper's).
    latent_clip: float | None
    #: Multiplier on every hidden width (classifier excluded), rounded half up.
    width_mult: float
    #: Architecture-specific options (e.g. AlexNet's dropout).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def decoupled(self) -> bool:
        return self.variant == "decoupled"

    def width(self, baseline: int, coupled: int) -> int:
        """The variant's width of a layer given its baseline and coupled widths."""
        chosen = baseline if self.variant in ("fp", "bnn") else coupled
        return max(1, int(chosen * self.width_mult + 0.5))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ste"] = self.ste.value
        return out


@dataclass(frozen=True)
class _Architecture:
    builder: Callable[[ModelConfig], nn.Module]
    num_classes: int
    in_channels: int
    input_size: int
    #: True: input_size is the only size the layer shapes allow; else any size >= min_input_size.
    fixed_input_size: bool
    min_input_size: int
    extra_options: dict[str, Any]
    doc: str


_REGISTRY: dict[str, _Architecture] = {}

_COMMON_OPTIONS = (
    "num_classes", "in_channels", "input_size", "weight_bits", "act_bits", "act_levels", "ste",
    "swishsign_beta", "per_channel_scale", "latent_clip", "width_mult",
)


def register(name: str, *, num_classes: int, in_channels: int, input_size: int,
             fixed_input_size: bool, min_input_size: int = 32,
             extra_options: dict[str, Any] | None = None):
    """Decorator registering ``builder(config) -> nn.Module`` under ``name``."""

    def decorate(builder: Callable[[ModelConfig], nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = _Architecture(
            builder, num_classes, in_channels, input_size, fixed_input_size, min_input_size,
            dict(extra_options or {}), (builder.__doc__ or "").strip().splitlines()[0])
        return builder

    return decorate


def names() -> list[str]:
    """Registered architecture names."""
    return sorted(_REGISTRY)


def variants() -> tuple[str, ...]:
    return VARIANTS


def describe(name: str) -> str:
    return _architecture(name).doc


def options(name: str) -> list[str]:
    """Options ``build`` accepts for ``name``."""
    return sorted((*_COMMON_OPTIONS, *_architecture(name).extra_options))


def _architecture(name: str) -> _Architecture:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(names())}") from None


def _positive_int(option: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"option {option}={value!r} must be an integer >= {minimum}")
    return value


def resolve_config(name: str, variant: str, **opts: Any) -> ModelConfig:
    """Checks ``opts`` against what ``name`` accepts and fills in the defaults."""
    arch = _architecture(name)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for model {name!r}; "
                         f"valid variants: {', '.join(VARIANTS)}")
    unknown = sorted(set(opts) - set(options(name)))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for model {name!r}; "
                         f"valid options: {', '.join(options(name))}")

    num_classes = _positive_int("num_classes", opts.get("num_classes", arch.num_classes))
    in_channels = _positive_int("in_channels", opts.get("in_channels", arch.in_channels))
    input_size = _positive_int("input_size", opts.get("input_size", arch.input_size))
    if arch.fixed_input_size and input_size != arch.input_size:
        raise ValueError(f"option input_size={input_size} is not possible for {name!r}: its layer "
                         f"shapes need {arch.input_size}x{arch.input_size} inputs")
    if input_size < arch.min_input_size:
        raise ValueError(f"option input_size={input_size} is too small for {name!r} "
                         f"(minimum {arch.min_input_size})")

    weight_bits = opts.get("weight_bits", 32 if variant == "fp" else 1)
    if weight_bits not in (1, 32) or isinstance(weight_bits, bool):
        raise ValueError(f"option weight_bits={weight_bits!r} must be 1 or 32")

    act_levels = _resolve_levels(name, variant, opts)

    try:
        ste = STE(opts.get("ste", STE.CLIPPED_IDENTITY))
    except ValueError:
        raise ValueError(f"option ste={opts['ste']!r} must be one of "
                         f"{', '.join(s.value for s in STE)}") from None
    beta = opts.get("swishsign_beta", DEFAULT_SWISHSIGN_BETA)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta <= 0:
        raise ValueError(f"option swishsign_beta={beta!r} must be a positive number")

    per_channel = opts.get("per_channel_scale", False)
    if not isinstance(per_channel, bool):
        raise ValueError(f"option per_channel_scale={per_channel!r} must be true or false")
    latent_clip = opts.get("latent_clip")
    if latent_clip is not None and (isinstance(latent_clip, bool)
                                    or not isinstance(latent_clip, (int, float)) or latent_clip <= 0):
        raise ValueError(f"option latent_clip={latent_clip!r} must be a positive number or null")
    width_mult = opts.get("width_mult", 1.0)
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or width_mult <= 0:
        raise ValueError(f"option width_mult={width_mult!r} must be a positive number")

    extra = {key: opts.get(key, default) for key, default in arch.extra_options.items()}
    return ModelConfig(
        name=name, variant=variant, num_classes=num_classes, in_channels=in_channels,
        input_size=input_size, weight_bits=weight_bits, act_levels=act_levels, ste=ste,
        swishsign_beta=float(beta), per_channel_scale=per_channel,
        latent_clip=None if latent_clip is None else float(latent_clip),
        width_mult=float(width_mult), extra=extra)


def _resolve_levels(name: str, variant: str, opts: dict[str, Any]) -> int | None:
    if "act_bits" in opts and "act_levels" in opts:
        raise ValueError(f"options act_bits and act_levels for model {name!r} are exclusive; "
                         "give one")
    if "act_bits" in opts:
        bits = opts["act_bits"]
        if bits == FULL_PRECISION_BITS and not isinstance(bits, bool):
            levels = None
        else:
            if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
                raise ValueError(f"option act_bits={bits!r} must be an integer in 1..16, "
                                 f"or {FULL_PRECISION_BITS} for full precision")
            levels = levels_for_bits(bits)
    elif "act_levels" in opts:
        levels = opts["act_levels"]
        if levels is not None:
            levels = _positive_int("act_levels", levels)
    else:
        return DEFAULT_LEVELS[variant]
    if variant == "decoupled" and levels != 1:
        raise ValueError(f"a decoupled {name!r} is binary by construction; act_bits/act_levels "
                         f"cannot change that (got levels={levels})")
    return levels


def build(name: str, variant: str = "bnn", **opts: Any) -> nn.Module:
    """Builds registered model ``name`` in ``variant``; see ``options(name)`` for ``opts``."""
    config = resolve_config(name, variant, **opts)
    model = _REGISTRY[name].builder(config)
    model.config = config
    return model


def build_from_config(config: ModelConfig) -> nn.Module:
    """Rebuilds a model (fresh parameters) from a resolved config."""
    model = _architecture(config.name).builder(config)
    model.config = config
    return model
