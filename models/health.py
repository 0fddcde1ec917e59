"""Health of a binary network while it trains, accumulated on the device (pure PyTorch).

Per quantized activation (every ``ActQuant`` with levels; its name below is the layer's):

- ``ste_coverage``: fraction of pre-activations inside the STE's pass window ``0 < y < 1`` (the
  clipped identity's window, the same for binary and ternary, docs/method.md §1); outside it the
  gradient is zero.
- ``occupancy_<level>``: fraction of outputs at each level: ``0``, ``1`` (binary); ``0``, ``0.5``,
  ``1`` (ternary); ``i/n`` for k bits.

Per quantized convolution (every ``QConv2d``: the layers between quantized activations):

- ``flip_ratio``: fraction of latent weights whose sign s(w) (s(0) = +1) differs from the sign at
  the start of the epoch (the previous epoch's end).
- ``flip_ratio_step``: fraction whose sign changed in one optimizer step, averaged over the
  recorded steps.
- ``alpha``: mean|W| at the end of the epoch (binary weights only: the layer's scale).
- ``grad_norm``: L2 norm of the latent weight's gradient (what the optimizer applies), averaged
  over the recorded steps; absent where the parameters hold no ``.grad`` (DeepSpeed ZeRO >= 1).

:class:`HealthProbe` keeps every sum in one float64 tensor on the model's device and is driven
at named points of a training step (``step_started``, ``after_backward``, ``after_step``); none of
them reads a tensor's value on the host. Counts are exact: levels are counted from the quantizer's
output by float32 sums of values in {0, 1/2, 1} over chunks of at most 2**23 elements (every
partial sum is an exactly representable multiple of 1/2), and the STE window from the boolean
mask the clipped-identity quantizer saves for its backward (computed from ``y`` where there is
none). :meth:`HealthProbe.totals` packs an epoch's sums for one reduction over ranks and
:meth:`HealthProbe.summarize` turns the reduced numbers into named metrics.

:func:`activation_health` measures occupancy and STE coverage of a model on one batch (the
decouple transition compares the coupled and the decoupled network with it).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ActQuant, QConv2d
from .quantizers import STE

#: Every metric :class:`HealthProbe` can record (``occupancy`` stands for one per level).
METRICS = ("flip_ratio", "flip_ratio_step", "ste_coverage", "occupancy", "alpha", "grad_norm")
ACTIVATION_METRICS = frozenset({"ste_coverage", "occupancy"})
WEIGHT_METRICS = frozenset({"flip_ratio", "flip_ratio_step", "alpha", "grad_norm"})

#: Largest chunk summed in float32: every partial sum of values in {0, 1/2, 1} stays exact.
_EXACT_CHUNK = 2**23


def layer_name(qualified: str) -> str:
    """A short layer name for metric keys: ``features.conv3.act`` -> ``conv3``,
    ``units.4.branch.conv1`` -> ``unit4.conv1``."""
    parts = [p for p in qualified.split(".") if p not in ("features", "branch")]
    if len(parts) > 1 and parts[-1] in ("conv", "act"):
        parts = parts[:-1]
    return re.sub(r"units\.(\d+)", r"unit\1", ".".join(parts)) or qualified


def level_label(index: int, levels: int) -> str:
    """``occupancy_<label>`` of level ``index / levels``: ``0``, ``0.5``, ``1``."""
    return f"{index / levels:g}"


def exact_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor of values in {0, 1/2, 1} (a quantizer's output), exact, as float64."""
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    flat = values.reshape(-1)
    if flat.numel() <= _EXACT_CHUNK:
        return flat.sum().to(torch.float64)
    return torch.stack([chunk.sum() for chunk in flat.split(_EXACT_CHUNK)]).to(
        torch.float64).sum()


def level_counts(output: torch.Tensor, levels: int) -> torch.Tensor:
    """Counts of the non-zero levels ``1/n .. n/n`` in a quantizer's ``output`` (float64,
    shape ``(levels,)``); the count of level 0 is the rest."""
    if levels == 1:
        return exact_sum(output).reshape(1)
    if levels == 2:
        total = exact_sum(output)                               # halves / 2 + ones
        ones = exact_sum(F.threshold(output, 0.75, 0.0))        # 1 where the output is 1
        return torch.stack([2 * (total - ones), ones])
    return torch.stack([(output == i / levels).sum().to(torch.float64)
                        for i in range(1, levels + 1)])


def window_count(module: ActQuant, y: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """How many of ``y`` lie in the STE window 0 < y < 1 (float64 0-dim): the clipped identity's
    saved backward mask when the output has one, else computed from ``y``."""
    node = output.grad_fn
    if module.ste is STE.CLIPPED_IDENTITY and node is not None and \
            type(node).__name__ == "_ActivationQuantizerBackward":
        (mask,) = node.saved_tensors
        return torch.count_nonzero(mask).to(torch.float64)
    return torch.count_nonzero((y > 0) & (y < 1)).to(torch.float64)


@dataclass(frozen=True)
class ActivationSite:
    name: str
    module: ActQuant


@dataclass(frozen=True)
class WeightSite:
    name: str
    module: QConv2d

    @property
    def binary(self) -> bool:
        return self.module.weight_bits == 1


def activation_sites(model: nn.Module) -> list[ActivationSite]:
    return [ActivationSite(layer_name(n), m) for n, m in model.named_modules()
            if isinstance(m, ActQuant) and m.levels is not None]


def weight_sites(model: nn.Module) -> list[WeightSite]:
    return [WeightSite(layer_name(n), m) for n, m in model.named_modules()
            if isinstance(m, QConv2d)]


def _signs(weights: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.ge(w.detach(), 0) for w in weights]  # s(0) = s(-0) = +1


def pack_signs(signs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Boolean sign tensors as one CPU uint8 tensor, 8 signs a byte (a checkpoint's copy)."""
    flat = torch.cat([s.reshape(-1).cpu() for s in signs]).to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8)).reshape(-1, 8)
    return (flat << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_signs`, shaped and placed like ``like``."""
    bits = ((packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1).bool()
    out, start = [], 0
    for tensor in like:
        count = tensor.numel()
        out.append(bits[start:start + count].reshape(tensor.shape).to(tensor.device))
        start += count
    return out


class HealthProbe:
    """Sums of an epoch's health statistics for ``model``, on its device (see the module
    docstring). ``metrics`` chooses among :data:`METRICS`; ``every`` records the per-step
    statistics (activations, per-step flips, gradient norms) on every ``every``-th step only
    (by global step number, so a resumed epoch records the same steps).

    Layout of :attr:`sums` (float64): per activation site ``[window, c_1 .. c_n]``; then per
    weight site the summed per-step flip counts, then per weight site the summed gradient norms.
    Host-side integers: elements seen per activation site, recorded steps."""

    def __init__(self, model: nn.Module, metrics: Iterable[str] = METRICS, every: int = 1):
        self.metrics = frozenset(metrics)
        unknown = self.metrics - set(METRICS)
        if unknown:
            raise ValueError(f"unknown health metrics {sorted(unknown)}; choose from {METRICS}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.acts = activation_sites(model) if self.metrics & ACTIVATION_METRICS else []
        self.weights = weight_sites(model) if self.metrics & WEIGHT_METRICS else []
        self._offsets, start = [], 0
        for site in self.acts:
            self._offsets.append(start)
            start += 1 + site.module.levels
        self._flip_start = start
        self._grad_start = start + len(self.weights)
        size = self._grad_start + len(self.weights)
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        self.sums = torch.zeros(size, dtype=torch.float64, device=device)
        self.seen = [0] * len(self.acts)
        self.steps = 0
        self.grads_missing = False
        self.reference: list[torch.Tensor] = []
        self._before: list[torch.Tensor] | None = None
        # the signs after the last recorded step, and that step (None: the weights' signs now)
        self._last: list[torch.Tensor] | None = None
        self._last_step: int | None = None
        self._step = 0
        self._recording = False
        self._handles = [site.module.register_forward_hook(self._hook(i))
                         for i, site in enumerate(self.acts)]

    @property
    def activation_slots(self) -> int:
        """Leading entries of :attr:`sums` that are activation counts (they add up over ranks)."""
        return self._flip_start

    # -- named points ----------------------------------------------------------------------------
    def start_epoch(self) -> None:
        """Zero sums; the flip reference is the weights' signs now (the previous epoch's end)."""
        self.sums.zero_()
        self.seen = [0] * len(self.acts)
        self.steps = 0
        self.grads_missing = False
        self.reference = _signs(self._weight_tensors())
        self._last, self._last_step = self.reference, None

    def step_started(self, step: int) -> None:
        """Before the forward pass of global step ``step``: whether this step is recorded."""
        self._recording = step % self.every == 0
        self._step = step
        if self._recording:
            self.steps += 1
            if "flip_ratio_step" in self.metrics:
                # after a recorded step the signs are known (every step recorded: one compare
                # pass per step instead of two)
                fresh = self._last is not None and self._last_step in (None, step - 1)
                self._before = self._last if fresh else _signs(self._weight_tensors())

    def after_backward(self) -> None:
        """Gradient norms of the latent weights (the gradients the optimizer will apply)."""
        if not (self._recording and "grad_norm" in self.metrics and self.weights):
            return
        grads = [site.module.weight.grad for site in self.weights]
        if any(g is None for g in grads):
            self.grads_missing = True
            return
        norms = torch._foreach_norm([g.detach() for g in grads])
        self.sums[self._grad_start:].add_(torch.stack(norms).to(torch.float64))

    def after_step(self) -> None:
        """Signs changed by the optimizer step; the step is over (the hooks stop recording)."""
        if self._recording and self._before:
            after = _signs(self._weight_tensors())
            flips = torch.stack([torch.count_nonzero(torch.ne(a, b))
                                 for a, b in zip(after, self._before)])
            self.sums[self._flip_start:self._grad_start].add_(flips)
            self._last, self._last_step = after, self._step
        else:
            self._last = None
        self._before = None
        self._recording = False

    def _hook(self, index: int):
        site, offset = self.acts[index], self._offsets[index]
        levels = site.module.levels

        def record(module, args, output):
            if not self._recording:
                return
            y = args[0]
            stats = torch.cat([window_count(module, y, output).reshape(1),
                               level_counts(output.detach(), levels)])
            self.sums[offset:offset + 1 + levels].add_(stats)
            self.seen[index] += y.numel()
        return record

    # -- epoch end -------------------------------------------------------------------------------
    def totals(self) -> torch.Tensor:
        """This rank's epoch as one float64 tensor on the device (no host read): the sums, the
        flips since the reference and alpha per weight site, then the host counts."""
        weights = self._weight_tensors()
        now = _signs(weights)
        since = [torch.count_nonzero(torch.ne(a, b)).to(torch.float64)
                 for a, b in zip(now, self.reference)]
        alphas = [w.detach().abs().mean().to(torch.float64) for w in weights]
        host = torch.tensor([*self.seen, self.steps, float(self.grads_missing)],
                            dtype=torch.float64).to(self.sums.device)
        return torch.cat([self.sums, torch.stack(since) if since else self.sums.new_zeros(0),
                          torch.stack(alphas) if alphas else self.sums.new_zeros(0), host])

    def summarize(self, totals: Sequence[float], world_size: int = 1) -> dict[str, float]:
        """Named metrics ``health/<layer>/<metric>`` from :meth:`totals` summed over
        ``world_size`` ranks (activation counts add up; weight statistics, the same on every
        rank, are divided back)."""
        n_w = len(self.weights)
        sums, rest = list(totals[:len(self.sums)]), list(totals[len(self.sums):])
        since, alphas = rest[:n_w], rest[n_w:2 * n_w]
        host = rest[2 * n_w:]
        seen, steps, missing = host[:len(self.acts)], host[len(self.acts)] / world_size, \
            host[len(self.acts) + 1]
        out: dict[str, float] = {}
        for i, site in enumerate(self.acts):
            levels, offset = site.module.levels, self._offsets[i]
            total = seen[i]
            if not total:
                continue
            if "ste_coverage" in self.metrics:
                out[f"health/{site.name}/ste_coverage"] = sums[offset] / total
            if "occupancy" in self.metrics:
                counts = sums[offset + 1:offset + 1 + levels]
                out[f"health/{site.name}/occupancy_0"] = (total - sum(counts)) / total
                for k, count in enumerate(counts, start=1):
                    out[f"health/{site.name}/occupancy_{level_label(k, levels)}"] = count / total
        for j, site in enumerate(self.weights):
            numel = site.module.weight.numel()
            key = f"health/{site.name}"
            if "flip_ratio" in self.metrics:
                out[f"{key}/flip_ratio"] = since[j] / world_size / numel
            if "flip_ratio_step" in self.metrics and steps:
                out[f"{key}/flip_ratio_step"] = \
                    sums[self._flip_start + j] / world_size / steps / numel
            if "alpha" in self.metrics and site.binary:
                out[f"{key}/alpha"] = alphas[j] / world_size
            if "grad_norm" in self.metrics and steps and not missing:
                out[f"{key}/grad_norm"] = sums[self._grad_start + j] / world_size / steps
        return out

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's sums within an epoch (a host read: checkpoint time only)."""
        return {"sums": self.sums.tolist(), "seen": list(self.seen), "steps": self.steps,
                "grads_missing": self.grads_missing}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(torch.tensor(state["sums"], dtype=torch.float64))
        self.seen = [int(v) for v in state["seen"]]
        self.steps = int(state["steps"])
        self.grads_missing = bool(state["grads_missing"])

    def reference_state(self) -> torch.Tensor:
        return pack_signs(self.reference)

    def load_reference(self, packed: torch.Tensor) -> None:
        self.reference = unpack_signs(packed, self._weight_tensors())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _weight_tensors(self) -> list[torch.Tensor]:
        return [site.module.weight for site in self.weights]


@dataclass(frozen=True)
class ActivationHealth:
    """One activation site on one batch: elements, STE-window count, count per level 0..n."""

    numel: int
    window: int
    counts: tuple[int, ...]

    @property
    def coverage(self) -> float:
        return self.window / self.numel

    def occupancy(self) -> dict[str, float]:
        levels = len(self.counts) - 1
        return {level_label(i, levels): c / self.numel for i, c in enumerate(self.counts)}


@torch.no_grad()
def activation_health(model: nn.Module, batch: torch.Tensor, *, train: bool = False,
                      autocast: torch.dtype | None = None,
                      keep_outputs: bool = False) -> tuple[dict[str, ActivationHealth], dict]:
    """Occupancy and STE coverage of every quantized activation of ``model`` on ``batch`` (BN in
    eval mode unless ``train``); with ``keep_outputs`` also each site's (pre-activation, output)
    tensors.
    The model's mode is restored."""
    sites = activation_sites(model)
    found: dict[str, ActivationHealth] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook_for(site: ActivationSite):
        def record(module, args, output):
            y, levels = args[0], module.levels
            nonzero = level_counts(output, levels).tolist()
            numel = y.numel()
            window = int(torch.count_nonzero((y > 0) & (y < 1)))
            found[site.name] = ActivationHealth(numel, window,
                                                (int(numel - sum(nonzero)), *map(int, nonzero)))
            if keep_outputs:
                outputs[site.name] = (y.clone(), output.clone())
        return record

    handles = [s.module.register_forward_hook(hook_for(s)) for s in sites]
    was_training = model.training
    model.train(train)
    try:
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16,
                            enabled=autocast is not None):
            model(batch.to(device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return found, outputs


def decoupled_pair_counts(output: torch.Tensor) -> torch.Tensor:
    """For a decoupled activation ``[B(y - 1/4); B(y + 1/4)]`` (copy-major on dim 1), how many of
    each pair are at 1 (0, 1 or 2) per coupled position: twice the ternary level it stands for."""
    half = output.shape[1] // 2
    return output[:, :half] + output[:, half:]


def transition_health(coupled: nn.Module, decoupled: nn.Module, batch: torch.Tensor, *,
                      autocast: torch.dtype | None = None) -> dict[str, float]:
    """Occupancy and STE coverage of the coupled and the decoupled network on one batch (BN in
    eval mode), as ``decouple_health/{coupled,decoupled}/<layer>/<metric>``, and per layer
    ``decouple_health/<layer>/level_mismatch``: the fraction of coupled positions where the two
    binary copies at 1 are not twice the ternary level (0 when decoupling is exact; float32
    round-off within reach of a threshold can make it non-zero)."""
    ternary, t_out = activation_health(coupled, batch, autocast=autocast, keep_outputs=True)
    binary, b_out = activation_health(decoupled, batch, autocast=autocast, keep_outputs=True)
    out: dict[str, float] = {}
    for side, found in (("coupled", ternary), ("decoupled", binary)):
        for name, site in found.items():
            out[f"decouple_health/{side}/{name}/ste_coverage"] = site.coverage
            for level, share in site.occupancy().items():
                out[f"decouple_health/{side}/{name}/occupancy_{level}"] = share
    for name in ternary.keys() & binary.keys():
        levels = t_out[name][1]
        pairs = decoupled_pair_counts(b_out[name][1])
        if pairs.shape == levels.shape:
            out[f"decouple_health/{name}/level_mismatch"] = \
                float((pairs != 2 * levels).sum()) / levels.numel()
    return out


__all__ = ["METRICS", "ActivationHealth", "HealthProbe", "activation_health",
           "activation_sites", "decoupled_pair_counts", "transition_health", "exact_sum", "layer_name",
           "level_counts", "pack_signs", "unpack_signs", "weight_sites", "window_count"]
