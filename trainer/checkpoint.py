"""Checkpoints: DeepSpeed engine state plus a portable model file, written so a crash never
destroys the previous one.

Layout of one stage: ``<run>/checkpoints/<stage>/``

- ``epoch-0003/``: ``engine.save_checkpoint`` output (model, optimizer, client state) and
  ``model_state.pt`` (the module's ``state_dict``, loadable with ``torch.load(weights_only=True)``);
- ``epoch-0003-step-000120/``: a mid-epoch checkpoint (120 steps into epoch 4), written when a
  preemption signal stops the run; it is ``latest`` until the epoch ends, never ``best``;
- ``manifest.json``: which epochs are complete, the latest, and the best by validation top-1.

A checkpoint is written as ``epoch-0003.partial/`` and renamed when every file is in place; the
manifest is replaced atomically afterwards. A crash mid-write leaves a ``.partial`` directory that
is ignored (and cleared by the next save) and a manifest that still names the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

MODEL_FILE = "model_state.pt"
MANIFEST = "manifest.json"


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

    def __init__(self, directory: Path, *, keep_last: int, is_main: bool):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.is_main = is_main

    # -- manifest -------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        path = self.directory / MANIFEST
        if not path.exists():
            return {"epochs": [], "latest": None, "best": None}
        return json.loads(path.read_text())

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
        """Epoch-end checkpoint (``step`` 0), or a mid-epoch one ``step`` steps after it."""
        tag = epoch_tag(epoch, step)
        partial = self.directory / f"{tag}.partial"
        if self.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()
        engine.save_checkpoint(str(self.directory), tag=partial.name, client_state=client_state,
                               save_latest=False)
        _barrier()
        if self.is_main:
            state = {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}
            torch.save(state, partial / MODEL_FILE)
            final = self.directory / tag
            shutil.rmtree(final, ignore_errors=True)  # an epoch redone after a resume
            os.replace(partial, final)
            if step:
                self._update_manifest_mid_epoch(tag, epoch, step)
            else:
                self._update_manifest(tag, epoch, top1)
        _barrier()
        return tag

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
        for entry in epochs:
            if entry["tag"] not in keep:
                shutil.rmtree(self.directory / entry["tag"], ignore_errors=True)
        manifest = {"epochs": [e for e in epochs if e["tag"] in keep], "latest": tag, "best": best}
        atomic_write_text(self.directory / MANIFEST, json.dumps(manifest, indent=2))
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
            if path.name != keep_tag and not path.name.endswith(".partial"):
                shutil.rmtree(path, ignore_errors=True)

    # -- reading --------------------------------------------------------------------------------
    def load(self, engine, tag: str) -> dict[str, Any]:
        """Restores engine (model + optimizer) state from ``tag``; returns the client state."""
        path, client_state = engine.load_checkpoint(str(self.directory), tag=tag,
                                                    load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"checkpoint {self.directory / tag} could not be loaded")
        return client_state


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    """A portable model file, loaded without executing code."""
    return torch.load(path, map_location="cpu", weights_only=True)
