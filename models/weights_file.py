"""Reading a model's weights file without executing code (pure PyTorch).

``torch.load(weights_only=True)`` unpickles tensors and plain containers only; a file that needs
anything more (a pickled class, a function: loading it would run code) is refused with
:class:`UntrustedWeightsError`, one that cannot be read at all with
:class:`UnreadableWeightsError`, each with a one-line reason naming the file. Every weights file
binaryduo opens goes through :func:`load_weights`: checkpoints, ``init_from`` files, exported and
analysed models, and a distillation teacher's checkpoint (checked when the recipe is validated).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch


class UnreadableWeightsError(RuntimeError):
    """A weights file is truncated, corrupt or not a torch file."""


class UntrustedWeightsError(RuntimeError):
    """A weights file holds objects that loading would execute (not plain tensors/containers)."""


def refusal(path: Path, error: Exception) -> RuntimeError:
    """The one-line reason ``torch.load(weights_only=True)`` refused ``path`` with ``error``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    culprit = next((line for line in lines if "GLOBAL" in line or "global" in line), None)
    if isinstance(error, pickle.UnpicklingError) and culprit:
        return UntrustedWeightsError(
            f"{path}: refusing to load: it holds objects that loading would execute, not only "
            f"tensors ({culprit.rstrip('.')})")
    reason = lines[0].split(". ")[0] if lines else type(error).__name__
    return UnreadableWeightsError(f"{path}: unreadable ({reason}; truncated or corrupt?)")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict (or any plain tensors and containers) from ``path``, on the CPU, loaded
    without executing code; see the module docstring. A missing file raises
    ``FileNotFoundError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise refusal(Path(path), error) from None


__all__ = ["UnreadableWeightsError", "UntrustedWeightsError", "load_weights", "refusal"]
