"""Running a rank's DALI graph epoch after epoch: one pipeline, built once, re-seeded per epoch.

:class:`EpochRunner` owns the loader's pipeline (:func:`.dali_graph.fed_pipeline`). Each call of
:meth:`EpochRunner.batches` feeds one epoch's (or the rest of one epoch's) dataset indices batch
by batch, keeps two iterations in flight, and schedules exactly one batch per index chunk --
nothing past the end of the epoch, so the next epoch starts from a clean pipeline.

Re-seeding. A loader's epochs draw DALI's augmentation (random-crop decoder, random resized
crop, coin flips, the ``small`` preset's offsets on files) from the pipeline seed
``(seed, epoch, rank)``, as a pipeline built for that epoch with that seed would
(:func:`.dali_graph.epoch_pipeline`). A DALI pipeline gives operator ``k`` (counting operators
that take a seed, in graph order) the seed ``std::seed_seq{pipeline_seed}.generate(1024)[k]``, and
every random operator keeps a Philox state ``(key = that seed, counter, phase)``, which DALI's
checkpointing saves and restores. Before each epoch the runner therefore restores the
checkpoint taken right after the build with each Philox key replaced by the key a fresh
pipeline of the epoch's seed would have: the epoch then draws exactly the numbers it drew when
every epoch built its own pipeline.

The rewrite is checked, not assumed: the built pipeline's own keys must be found at consecutive
slots of its own seed's table, and every operator state in its checkpoint must be empty or a
Philox one. Where that fails (another DALI version), the runner warns once and falls back to
building one pipeline per epoch -- slower, identical batches.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Iterator

import numpy as np

from .dali_graph import GraphConfig, epoch_pipeline, fed_batch, fed_pipeline

#: seeds a DALI pipeline derives for its operators (``Pipeline::MAX_SEEDS``)
MAX_SEEDS = 1024
#: how many iterations are scheduled ahead of the consumer
AHEAD = 2
_PHILOX = re.compile(rb"Philox_([0-9A-F]{16})_[0-9A-F]{16}:[0-9A-F]{16}_\d+")


class ReseedUnsupported(RuntimeError):
    """The pipeline's checkpoint is not what :class:`Reseeder` knows how to rewrite."""


def seed_seq(seed: int, n: int = MAX_SEEDS) -> list[int]:
    """``std::seed_seq{seed}.generate(n values)`` ([rand.util.seedseq] of C++11)."""
    mask, seeds = 0xFFFFFFFF, [int(seed) & 0xFFFFFFFF]
    s = len(seeds)
    b = [0x8B8B8B8B] * n
    t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
    p = (n - t) // 2
    q = p + t
    m = max(s + 1, n)
    for k in range(m):
        x = b[k % n] ^ b[(k + p) % n] ^ b[(k - 1) % n]
        r1 = (1664525 * (x ^ (x >> 27))) & mask
        r2 = (r1 + (s if k == 0 else k % n + seeds[k - 1] if k <= s else k % n)) & mask
        b[(k + p) % n] = (b[(k + p) % n] + r1) & mask
        b[(k + q) % n] = (b[(k + q) % n] + r2) & mask
        b[k % n] = r2
    for k in range(m, m + n):
        x = (b[k % n] + b[(k + p) % n] + b[(k - 1) % n]) & mask
        r3 = (1566083941 * (x ^ (x >> 27))) & mask
        r4 = (r3 - k % n) & mask
        b[(k + p) % n] ^= r3
        b[(k + q) % n] ^= r4
        b[k % n] = r4
    return b


def _operator_states(checkpoint: bytes) -> list[tuple[bytes, bytes]]:
    """``(name, state)`` of every operator in a serialized DALI checkpoint (protobuf: repeated
    field 1 = ``{1: name, 2: state}``; field 2, the external context, is skipped)."""
    def varint(data, pos):
        value = shift = 0
        while True:
            byte = data[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return value, pos

    def fields(data):
        pos = 0
        while pos < len(data):
            tag, pos = varint(data, pos)
            if tag & 7 != 2:
                raise ReseedUnsupported(f"unexpected protobuf wire type {tag & 7}")
            size, pos = varint(data, pos)
            yield tag >> 3, data[pos:pos + size]
            pos += size

    states = []
    for number, op in fields(checkpoint):
        if number == 1:
            entry = dict(fields(op))
            states.append((entry.get(1, b""), entry.get(2, b"")))
    return states


class Reseeder:
    """Checkpoints putting a pipeline's random operators where a fresh pipeline of another seed
    would start them (see the module docstring). ``template``: the pipeline's checkpoint right
    after its build with ``build_seed``; ``offset``: seed slots the reference graph uses before
    the first random operator (:attr:`.GraphConfig.reference_seed_offset`)."""

    def __init__(self, template: bytes, build_seed: int, offset: int):
        try:
            states = _operator_states(template)
        except (IndexError, ReseedUnsupported) as error:
            raise ReseedUnsupported(f"unreadable checkpoint ({error})") from None
        for name, state in states:
            if state and not _PHILOX.fullmatch(state):
                raise ReseedUnsupported(f"operator {name.decode(errors='replace')} has a "
                                        f"state that is not a fresh Philox one: {state[:60]!r}")
        keys = [int(match.group(1), 16) for match in _PHILOX.finditer(template)]
        table = seed_seq(build_seed)
        try:
            slots = [table.index(key) for key in keys]
        except ValueError:
            raise ReseedUnsupported("operator keys are not the pipeline's seed_seq seeds") \
                from None
        if slots != list(range(len(keys))):
            raise ReseedUnsupported(f"operator keys at seed slots {slots}, expected 0..")
        self.template, self.slots = template, [slot + offset for slot in slots]
        if max(self.slots, default=0) >= MAX_SEEDS:
            raise ReseedUnsupported("more random operators than seeds")

    def checkpoint(self, seed: int) -> bytes:
        table = seed_seq(seed)
        keys = iter(self.slots)
        # same-length substitution: the protobuf's length prefixes stay valid
        return _PHILOX.sub(lambda m: m.group(0).replace(
            m.group(1), b"%016X" % table[next(keys)]), self.template)


class EpochRunner:
    """One rank's DALI pipeline, built on first use and reused by every later epoch.

    ``builds`` counts the pipelines built (1 for a loader's lifetime, unless a DALI error
    forced a rebuild or the fallback builds one per epoch). A new :meth:`batches` call while an
    earlier one is suspended mid-epoch takes the pipeline over (draining what the earlier one
    had scheduled); resuming the earlier one then raises ``RuntimeError``.
    """

    def __init__(self, config: GraphConfig, *, files: tuple[str, ...] | None,
                 shard_images: np.ndarray | None, dataset_labels: np.ndarray):
        self.config = config
        self._data = dict(files=files, shard_images=shard_images, dataset_labels=dataset_labels)
        self.builds = 0
        self.persistent = True  # False: the fallback, one pipeline per epoch
        self._pipe = self._reseeder = self._owner = None
        self._in_flight = 0

    def batches(self, indices: np.ndarray, keys: np.ndarray | None,
                seed: int) -> Iterator[tuple[object, object]]:
        """DALI ``(images, labels)`` batches of ``indices``, in order (the last padded to a
        full batch), drawing DALI's randomness as a fresh pipeline seeded ``seed`` would."""
        if len(indices) == 0:
            return iter(())
        if self.persistent:
            self._prepare(seed)
        if not self.persistent:
            return self._rebuilt(indices, keys, seed)
        return self._persistent(indices, keys, seed)

    def _prepare(self, seed: int) -> None:
        """Builds the pipeline if needed and takes it over from an unfinished iteration."""
        self._owner = None
        if self._pipe is not None and self._in_flight:
            try:
                self._drain()
            except Exception:
                self._pipe = None
        if self._pipe is not None:
            return
        self._in_flight = 0
        if not self.config.random:
            self._pipe = fed_pipeline(self.config, seed=seed)
            self.builds += 1
            return
        # Checkpointing and its restore are what may be missing (an operator without them, the
        # backend's restore on a built pipeline): no data is read yet, so any failure here is one
        try:
            self._pipe = fed_pipeline(self.config, seed=seed)
            self.builds += 1
            template = self._pipe.checkpoint()
            self._reseeder = Reseeder(template, seed, self.config.reference_seed_offset)
            self._pipe._pipe.RestoreFromSerializedCheckpoint(template)  # the restore works
        except Exception as error:  # noqa: BLE001 -- fall back, same batches
            warnings.warn(f"DALI pipelines cannot be re-seeded here ({error!r:.300}): building "
                          "one pipeline per epoch instead (same batches, ~1-2 s more per epoch "
                          "on a GPU)", RuntimeWarning, stacklevel=4)
            self.persistent, self._pipe, self._reseeder = False, None, None

    def _drain(self) -> None:
        while self._in_flight:
            self._in_flight -= 1
            self._pipe.outputs()

    def _persistent(self, indices, keys, seed):
        pipe, bs, owner = self._pipe, self.config.batch_size, object()
        steps = math.ceil(len(indices) / bs)
        self._owner = owner
        if self._reseeder is not None:
            pipe._pipe.RestoreFromSerializedCheckpoint(self._reseeder.checkpoint(seed))

        def schedule(k):
            batch = fed_batch(self.config, indices[k * bs:(k + 1) * bs], keys=keys, **self._data)
            for name, data in batch.items():
                pipe.feed_input(name, data)
            pipe.schedule_run()
            self._in_flight += 1

        healthy = False
        try:
            for k in range(min(AHEAD, steps)):
                schedule(k)
            for k in range(steps):
                outputs = pipe.outputs()
                self._in_flight -= 1
                if k + AHEAD < steps:
                    schedule(k + AHEAD)
                healthy = True
                yield outputs
                healthy = False
                if self._owner is not owner:
                    raise RuntimeError("a newer iteration over this loader took its pipeline "
                                       "over: iterate one pass at a time")
            healthy = True
        finally:
            if self._owner is owner:
                self._owner = None
                try:
                    if not healthy:
                        raise RuntimeError("interrupted inside DALI")
                    self._drain()  # stopped early: consume what is still scheduled
                except BaseException:
                    self._pipe, self._in_flight = None, 0  # unknown state: rebuild next time

    def _rebuilt(self, indices, keys, seed):
        bs = self.config.batch_size
        steps = math.ceil(len(indices) / bs)
        depth = min(AHEAD, steps)
        pipe = epoch_pipeline(self.config, indices, keys=keys, seed=seed, depth=depth,
                              **self._data)
        self.builds += 1
        try:
            pipe.schedule_run()  # the first call schedules `depth` iterations
            scheduled = depth
            for _ in range(steps):
                outputs = pipe.outputs()
                if scheduled < steps:
                    pipe.schedule_run()
                    scheduled += 1
                yield outputs
        finally:
            del pipe
