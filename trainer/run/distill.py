"""Knowledge distillation for a stage (``distill:`` in the recipe; schema: DistillSection).

The teacher is an earlier stage of the same recipe (its best or last checkpoint, built as that
stage) or a model file (a registry model, or ``torchvision/<name>`` such as ReActNet's ResNet-34
teacher), always read through the same safe loader as every checkpoint (no code runs). It runs in
eval mode under ``no_grad`` in the run's precision on the student's own (augmented) batch, is
never handed to the optimizer, and is not part of the DeepSpeed engine: nothing steps it.

Its cost is measured, not guessed: the teacher's forward time per epoch (CUDA events read once at
the epoch's end on a GPU, so no host sync per step), logged beside the student's throughput with
and without it.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from binaryduo.trainer.recipe import Recipe
from binaryduo.trainer.recipe.schema import DistillSection, TeacherSection
from binaryduo.trainer.recipe.teacher import build_teacher_model
from binaryduo.trainer.run.checkpoint import StageCheckpoints, load_model_state
from binaryduo.trainer.run.precision import compute_precision, memory_format

def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, *, weight: float, temperature: float) -> torch.Tensor:
    """(1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher/T) || softmax(student/T)),
    the KL averaged over the batch (``batchmean``: the true KL per sample), in float32."""
    student = student_logits.float()
    ce = F.cross_entropy(student, labels)
    if weight == 0:
        return ce
    kl = F.kl_div(F.log_softmax(student / temperature, dim=1),
                  F.log_softmax(teacher_logits.float() / temperature, dim=1),
                  log_target=True, reduction="batchmean")
    return (1 - weight) * ce + weight * temperature ** 2 * kl


def teacher_checkpoint(teacher: TeacherSection, output_dir: Path) -> tuple[Path, float | None]:
    """The teacher's model file and, for a stage of this run, its validation top-1."""
    if teacher.stage is None:
        return Path(teacher.checkpoint), None
    source = StageCheckpoints(output_dir / "checkpoints" / teacher.stage, keep_last=1,
                              is_main=False)
    manifest = source.manifest()
    chosen = manifest["best"] if teacher.checkpoint_tag == "best" else manifest["epochs"][-1]
    return source.verified_model_file(teacher.checkpoint_tag), chosen["top1"]


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass
class Distiller:
    """The stage's teacher and its loss; ``loss`` replaces the plain cross-entropy in the loop."""

    teacher: torch.nn.Module
    spec: DistillSection
    dtype: torch.dtype
    device: torch.device
    #: MLflow params of the stage run: where the teacher came from
    provenance: dict[str, str]
    _timings: list = field(default_factory=list)
    _seconds: float = 0.0

    def loss(self, logits: torch.Tensor, labels: torch.Tensor,
             inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), compute_precision(self.dtype, self.device):
            if self.device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                teacher_logits = self.teacher(inputs)
                end.record()
                self._timings.append((start, end))
            else:
                started = time.perf_counter()
                teacher_logits = self.teacher(inputs)
                self._seconds += time.perf_counter() - started
        return distillation_loss(logits, teacher_logits, labels, weight=self.spec.weight,
                                 temperature=self.spec.temperature)

    def epoch_metrics(self, images: int, seconds: float) -> dict[str, float]:
        """The teacher's share of the epoch (this rank): its forward seconds and the throughput
        without them (what the student alone would have run at)."""
        if self._timings:  # once per epoch: the events' times need the device to have finished
            torch.cuda.synchronize(self.device)
            self._seconds += sum(start.elapsed_time(end) for start, end in self._timings) / 1000
            self._timings.clear()
        teacher, self._seconds = self._seconds, 0.0
        student = max(seconds - teacher, 1e-9)
        return {"distill_teacher_seconds": teacher,
                "distill_teacher_fraction": teacher / max(seconds, 1e-9),
                "images_per_second_without_teacher": images / student}


def make_distiller(recipe: Recipe, spec: DistillSection, *, output_dir: Path,
                   device: torch.device, dtype: torch.dtype) -> Distiller:
    teacher = build_teacher_model(recipe, spec.teacher)
    path, top1 = teacher_checkpoint(spec.teacher, output_dir)
    teacher.load_state_dict(load_model_state(path))
    teacher.to(device, memory_format=memory_format(device)).eval().requires_grad_(False)
    source = f"stage {spec.teacher.stage} ({spec.teacher.checkpoint_tag})" \
        if spec.teacher.stage is not None else f"{spec.teacher.model} ({spec.teacher.variant})"
    provenance = {"distill.teacher": source, "distill.teacher_checkpoint": str(path.resolve()),
                  "distill.teacher_sha256": _file_sha256(path),
                  "distill.teacher_top1": "unknown" if top1 is None else f"{top1:.4f}",
                  "distill.weight": str(spec.weight),
                  "distill.temperature": str(spec.temperature)}
    return Distiller(teacher, spec, dtype, device, provenance)
