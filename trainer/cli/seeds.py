"""``--seeds`` lists, as ``binaryduo sweep`` and ``binaryduo slurm submit`` take them.

``0-4`` (inclusive range), ``0,2,7``, ``0-2,10``; seeds are non-negative integers, each at most
once. A bad list is a :class:`~binaryduo.trainer.cli.errors.UsageError` naming the text.
"""
from __future__ import annotations

import re

from binaryduo.trainer.cli.errors import UsageError

#: One sweep of more runs than this is almost certainly a typo (``0-10000``), not a plan.
MAX_SEEDS = 1000
_ITEM = re.compile(r"(\d+)(?:-(\d+))?")


def parse_seeds(text: str, *, option: str = "--seeds") -> list[int]:
    """The seeds of ``text`` in the order given (ranges ascending)."""
    seeds: list[int] = []
    for item in text.split(","):
        match = _ITEM.fullmatch(item.strip())
        if match is None:
            raise UsageError(f"{option} {text!r}: {item.strip()!r} is not a seed or a range "
                             f"FIRST-LAST of non-negative integers (e.g. 0-4 or 0,2,7)")
        first = int(match[1])
        last = int(match[2]) if match[2] is not None else first
        if last < first:
            raise UsageError(f"{option} {text!r}: range {item.strip()!r} ends before it starts")
        if last - first + 1 + len(seeds) > MAX_SEEDS:
            raise UsageError(f"{option} {text!r}: more than {MAX_SEEDS} seeds")
        for seed in range(first, last + 1):
            if seed in seeds:
                raise UsageError(f"{option} {text!r}: seed {seed} given twice")
            seeds.append(seed)
    return seeds


def refuse_seed_override(overrides: list[str], *, option: str = "--seeds") -> None:
    """``--set seed=...`` beside ``--seeds`` is ambiguous: refused."""
    for override in overrides:
        if override.partition("=")[0].strip() == "seed":
            raise UsageError(f"--set {override!r}: the seed is set per run by {option}")
