"""Checkpoints: DeepSpeed engine state plus a portable model file, written so a crash never
destroys the previous one.

Layout of one stage: ``<run>/checkpoints/<stage>/``

- ``epoch-0003/``: ``engine.save_checkpoint`` output (model, optimizer, client state) and
  ``model_state.pt`` (the module's ``state_dict``, loadable with ``torch.load(weights_only=True)``);
- ``epoch-0003-step-000120/``: a mid-epoch checkpoint (120 steps into epoch 4), written when a
  preemption signal stops the run; it is ``latest`` until the epoch ends, never ``best``;
- ``manifest.json``: which epochs are complete, the latest, and the best by validation top-1.

A checkpoint is written as ``epoch-0003.partial/``, its files' sizes and SHA-256 recorded in
``checksums.json``, then renamed when every file is in place; the manifest is replaced atomically
afterwards. A crash mid-write leaves a ``.partial`` directory that is ignored (and cleared by the
next save) and a manifest that still names the previous checkpoint. A write that fails (a full
disk) removes its ``.partial`` directory and raises :class:`CheckpointWriteError`; the previous
checkpoint is untouched.

On resume, :meth:`StageCheckpoints.resume_tag` verifies the latest checkpoint against its
checksums; a corrupt or truncated one is reported, moved aside to ``<tag>.corrupt`` (kept for a
post-mortem, never loaded) and the previous good one is used instead -- seeds are functions of
(stage, epoch), so the redone epochs are bit-identical. Before DeepSpeed loads a checkpoint (it
unpickles with ``weights_only=False``), every ``.pt`` file of it is opened with
``torch.load(weights_only=True)`` first: a file that would need anything beyond tensors and plain
containers -- i.e. one that could run code -- is refused (:class:`UntrustedCheckpointError`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from binaryduo.models.weights_file import (UnreadableWeightsError, UntrustedWeightsError,
                                           load_weights)
from binaryduo.trainer.runtime.faults import NO_FAULTS, FaultHooks
from binaryduo.trainer.runtime.distributed import any_rank

MODEL_FILE = "model_state.pt"
MANIFEST = "manifest.json"
CHECKSUMS = "checksums.json"
TAG = re.compile(r"epoch-\d{4}(-step-\d{6})?")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


#: A checkpoint file is truncated, corrupt or missing where it is needed (the safe loader's
#: refusal of an unreadable file is one).
CheckpointCorruptError = UnreadableWeightsError
#: A checkpoint file holds objects that loading would execute (the safe loader's refusal).
UntrustedCheckpointError = UntrustedWeightsError


def _attempt(action) -> BaseException | None:
    """Runs ``action``; returns the write error it raised (a full disk, ...), or None. The
    OSError behind a library's RuntimeError (torch.save reports a failed write as a zip-writer
    error) is the one returned: it says what happened."""
    try:
        action()
    except (OSError, RuntimeError) as error:
        cause = error
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        return cause or error
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        os.fsync(handle.fileno())  # the bytes that were hashed are on disk before the rename
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """``checksums.json``: size and SHA-256 of every file under ``directory``."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
               for p in files}
    atomic_write_text(directory / CHECKSUMS, json.dumps(entries, indent=1, sort_keys=True))


def verify_checksums(directory: Path) -> str | None:
    """None when every file listed in ``checksums.json`` is present with its size and hash;
    else what is wrong (the first problem found)."""
    record = directory / CHECKSUMS
    if not directory.is_dir():
        return "directory missing"
    if not record.is_file():
        # checksums are written before the rename, so only a checkpoint of a binaryduo older
        # than them lacks the file: accepted (still opened weights-only before it is loaded)
        print(f"binaryduo: warning: {directory} has no {CHECKSUMS} (written before checksums "
              "existed): not verified", file=sys.stderr, flush=True)
        return None
    try:
        entries = json.loads(record.read_text())
    except (OSError, ValueError) as error:
        return f"{CHECKSUMS} unreadable ({error})"
    for name, want in sorted(entries.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} is {size} bytes, {want['bytes']} were written (truncated?)"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its SHA-256 (corrupt)"
    return None


def scan_untrusted(directory: Path) -> None:
    """Opens every ``.pt`` file under ``directory`` with ``weights_only=True``; raises
    :class:`UntrustedCheckpointError` naming the file if any needs more (code execution), or
    :class:`CheckpointCorruptError` if one cannot be read at all."""
    with torch.serialization.safe_globals(_deepspeed_data_classes()):
        for path in sorted(directory.rglob("*.pt")):
            load_weights(path)  # the safe loader, with DeepSpeed's data classes allowed


def _deepspeed_data_classes() -> list:
    """DeepSpeed's own plain-data classes in ZeRO >= 1 optimizer states (an enum, a loss-scale
    record, a (start, numel) pair): allowed, since unpickling them only sets attributes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename, with fsync, so readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def epoch_tag(epoch: int, step: int = 0) -> str:
    """Tag of the checkpoint taken after ``epoch`` (1-based) completed, or ``step`` steps into
    the epoch after it."""
    return f"epoch-{epoch:04d}" + (f"-step-{step:06d}" if step else "")


class StageCheckpoints:
    """Checkpoints of one stage; every rank calls ``save`` (DeepSpeed needs all of them)."""

    def __init__(self, directory: Path, *, keep_last: int, is_main: bool,
                 device: torch.device | str = "cpu", faults: FaultHooks = NO_FAULTS):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.is_main = is_main
        self.device = torch.device(device)  # where the ranks' agreement flags are reduced
        self.faults = faults

    # -- manifest -------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        path = self.directory / MANIFEST
        if not path.exists():
            return {"epochs": [], "latest": None, "best": None}
        try:
            manifest = json.loads(path.read_text())
            tags = [manifest["latest"], (manifest["best"] or {}).get("tag"),
                    *(e["tag"] for e in manifest["epochs"])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointCorruptError(f"{path}: unreadable ({error})") from None
        for tag in tags:  # tags become paths (rmtree, rename): nothing else is accepted
            if tag is not None and not (isinstance(tag, str) and TAG.fullmatch(tag)):
                raise CheckpointCorruptError(f"{path}: {tag!r} is not a checkpoint tag "
                                             "(epoch-NNNN[-step-SSSSSS])")
        return manifest

    def latest_tag(self) -> str | None:
        return self.manifest()["latest"]

    def tag_for(self, which: str) -> str:
        """``best`` (highest validation top-1) or ``last`` checkpoint's tag; raises if none."""
        manifest = self.manifest()
        if which == "best" and manifest["best"]:
            entry = manifest["best"]["tag"]
        else:  # the last completed epoch (never a mid-epoch checkpoint)
            entry = manifest["epochs"][-1]["tag"] if manifest["epochs"] else None
        if entry is None:
            raise FileNotFoundError(f"no completed checkpoint in {self.directory}")
        return entry

    def model_file(self, which: str) -> Path:
        return self.directory / self.tag_for(which) / MODEL_FILE

    # -- writing --------------------------------------------------------------------------------
    def save(self, engine, *, epoch: int, top1: float, client_state: dict[str, Any],
             step: int = 0) -> str:
        """Epoch-end checkpoint (``step`` 0), or a mid-epoch one ``step`` steps after it.

        Every rank calls it; a failure on any rank (a full disk) is agreed on by all of them, so
        every rank raises :class:`CheckpointWriteError` and none is left waiting in a barrier."""
        tag = epoch_tag(epoch, step)
        partial = self.directory / f"{tag}.partial"
        stage = self.directory.name
        if self.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()
        error = _attempt(lambda: engine.save_checkpoint(
            str(self.directory), tag=partial.name, client_state=client_state, save_latest=False))
        failed = self._failed_anywhere(error)
        if not failed:
            self.faults.kill_point("checkpoint", stage, epoch)
            if self.is_main:
                error = _attempt(lambda: self._complete(engine, partial, stage, epoch, step))
            failed = self._failed_anywhere(error)
        if failed:
            if self.is_main:
                shutil.rmtree(partial, ignore_errors=True)  # give the space back
            raise self._write_error(tag, stage, error)
        if self.is_main:
            error = _attempt(lambda: self._publish(partial, tag, stage, epoch, step, top1))
        if self._failed_anywhere(error):
            raise self._write_error(tag, stage, error)
        return tag

    def _complete(self, engine, partial: Path, stage: str, epoch: int, step: int) -> None:
        """The portable model file and the checksums, inside ``partial`` (rank 0)."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}
        with open(partial / MODEL_FILE, "wb") as handle:  # fsynced by write_checksums
            torch.save(state, self.faults.checkpoint_file(handle, stage, epoch, step))
        write_checksums(partial)

    def _publish(self, partial: Path, tag: str, stage: str, epoch: int, step: int,
                 top1: float) -> None:
        """Rename into place, then the manifest (rank 0)."""
        final = self.directory / tag
        shutil.rmtree(final, ignore_errors=True)  # an epoch redone after a resume
        os.replace(partial, final)
        self.faults.kill_point("manifest", stage, epoch)
        if step:
            self._update_manifest_mid_epoch(tag, epoch, step)
        else:
            self._update_manifest(tag, epoch, top1)

    def _failed_anywhere(self, error: BaseException | None) -> bool:
        """Collective: did this step fail on any rank?"""
        return any_rank(error is not None, self.device)

    def _write_error(self, tag: str, stage: str, error: BaseException | None) -> CheckpointWriteError:
        previous = self.manifest()["latest"]
        cause = error if error is not None else "another rank could not write its part"
        return CheckpointWriteError(
            f"checkpoint {tag} of stage {stage!r} could not be written to {self.directory} "
            f"({cause}); " + (f"the previous checkpoint {previous} is intact, resume from it with "
                              "--resume once there is room" if previous else
                              "no earlier checkpoint of this stage exists"))

    def _update_manifest(self, tag: str, epoch: int, top1: float) -> None:
        manifest = self.manifest()
        epochs = [e for e in manifest["epochs"] if e["epoch"] != epoch]
        epochs.append({"epoch": epoch, "tag": tag, "top1": top1})
        epochs.sort(key=lambda e: e["epoch"])
        best = manifest["best"]
        # the earliest epoch wins ties; an epoch redone after a resume replaces its own record
        if best is None or top1 > best["top1"] or best["epoch"] == epoch:
            best = {"epoch": epoch, "tag": tag, "top1": top1}
        keep = {e["tag"] for e in epochs[-self.keep_last:]} | {best["tag"]}
        manifest = {"epochs": [e for e in epochs if e["tag"] in keep], "latest": tag, "best": best}
        # the new manifest first, then pruning: a crash in between leaves extra directories,
        # never a manifest naming a deleted one
        atomic_write_text(self.directory / MANIFEST, json.dumps(manifest, indent=2))
        for entry in epochs:
            if entry["tag"] not in keep:
                shutil.rmtree(self.directory / entry["tag"], ignore_errors=True)
        self._remove_mid_epoch(keep_tag=None)

    def _update_manifest_mid_epoch(self, tag: str, epoch: int, step: int) -> None:
        manifest = self.manifest()
        manifest["latest"] = tag
        manifest["mid_epoch"] = {"epoch": epoch, "step": step, "tag": tag}
        atomic_write_text(self.directory / MANIFEST, json.dumps(manifest, indent=2))
        self._remove_mid_epoch(keep_tag=tag)

    def _remove_mid_epoch(self, keep_tag: str | None) -> None:
        """Mid-epoch checkpoints no longer named by the manifest (after it was replaced)."""
        for path in self.directory.glob("epoch-*-step-*"):
            if path.name != keep_tag and not path.name.endswith((".partial", ".corrupt")):
                shutil.rmtree(path, ignore_errors=True)

    # -- reading --------------------------------------------------------------------------------
    def resume_tag(self) -> str | None:
        """The newest checkpoint that verifies: the manifest's latest, else earlier completed
        epochs (newest first). Each one that fails is reported on stderr, moved aside to
        ``<tag>.corrupt`` and dropped from the manifest. None: nothing usable (the stage starts
        over). Rank 0 only (it renames); broadcast the answer."""
        manifest = self.manifest()
        candidates = [manifest["latest"]] if manifest["latest"] else []
        candidates += [e["tag"] for e in reversed(manifest["epochs"]) if e["tag"] not in candidates]
        bad = []
        for tag in candidates:
            problem = verify_checksums(self.directory / tag)
            if problem is None:
                if bad:
                    self._drop(bad)
                    print(f"binaryduo: warning: resuming stage {self.directory.name!r} from "
                          f"{tag} instead", file=sys.stderr, flush=True)
                return tag
            aside = (f"; moved aside to {tag}.corrupt" if (self.directory / tag).is_dir()
                     else "")
            print(f"binaryduo: warning: checkpoint {self.directory / tag} is not usable: "
                  f"{problem}{aside}", file=sys.stderr, flush=True)
            bad.append(tag)
        if bad:
            self._drop(bad)
            print(f"binaryduo: warning: no usable checkpoint of stage {self.directory.name!r}: it "
                  "starts over (seeded: the same result)", file=sys.stderr, flush=True)
        return None

    def _drop(self, tags: list[str]) -> None:
        """Moves ``tags`` aside and removes them from the manifest (best = the best remaining)."""
        for tag in tags:
            aside = self.directory / f"{tag}.corrupt"
            shutil.rmtree(aside, ignore_errors=True)
            if (self.directory / tag).exists():
                os.replace(self.directory / tag, aside)
        manifest = self.manifest()
        epochs = [e for e in manifest["epochs"] if e["tag"] not in tags]
        best = manifest["best"]
        if best is not None and best["tag"] in tags:
            best = None
            for entry in epochs:  # the earliest epoch wins ties, as in _update_manifest
                if best is None or entry["top1"] > best["top1"]:
                    best = dict(entry)
        latest = manifest["latest"] if manifest["latest"] not in tags else (
            epochs[-1]["tag"] if epochs else None)
        manifest = {"epochs": epochs, "latest": latest, "best": best}
        atomic_write_text(self.directory / MANIFEST, json.dumps(manifest, indent=2))

    def verified_model_file(self, which: str) -> Path:
        """``model_file(which)`` after checking its checkpoint; raises naming the problem."""
        tag = self.tag_for(which)
        problem = verify_checksums(self.directory / tag)
        if problem is not None:
            raise CheckpointCorruptError(f"the {which} checkpoint {self.directory / tag} of the "
                                         f"previous stage is not usable: {problem}")
        return self.directory / tag / MODEL_FILE

    def load(self, engine, tag: str) -> dict[str, Any]:
        """Restores engine (model + optimizer) state from ``tag``; returns the client state.
        The files are checked to hold nothing but tensors and containers first."""
        scan_untrusted(self.directory / tag)
        path, client_state = engine.load_checkpoint(str(self.directory), tag=tag,
                                                    load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"checkpoint {self.directory / tag} could not be loaded")
        return client_state


#: A portable model file, loaded without executing code (``weights_only=True``): the one safe
#: loader of every weights file (binaryduo.models.weights_file), whose refusals are
#: :class:`UntrustedCheckpointError` (code) and ``UnreadableWeightsError`` (corrupt).
load_model_state = load_weights