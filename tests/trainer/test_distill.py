"""Knowledge distillation (issue 18): the loss against a hand computation, a teacher that gets
no gradient and never changes, the teacher's provenance and cost in the record, and bad teacher
input refused before any compute (one line per problem naming the key, exit 2, nothing run)."""
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from binaryduo import models
from binaryduo.trainer.cli.main import main
from binaryduo.trainer.recipe.schema import DistillSection
from binaryduo.trainer.run.distill import Distiller, distillation_loss

REPO = Path(__file__).resolve().parents[2]


def test_distillation_loss_by_hand():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.5, 2.5]])
    labels = torch.tensor([0, 2])
    weight, temperature = 0.7, 2.0
    expected = 0.0
    for s, t, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        def softmax(z):
            exps = [math.exp(v) for v in z]
            return [e / sum(exps) for e in exps]
        ce = -math.log(softmax(s)[y])
        p_t = softmax([v / temperature for v in t])
        p_s = softmax([v / temperature for v in s])
        kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
        expected += ((1 - weight) * ce + weight * temperature ** 2 * kl) / len(labels)
    got = distillation_loss(student, teacher, labels, weight=weight, temperature=temperature)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # weight 0 is the plain cross-entropy, bit for bit
    plain = torch.nn.functional.cross_entropy(student, labels)
    assert torch.equal(distillation_loss(student, teacher, labels, weight=0.0,
                                         temperature=temperature), plain)
    # a student equal to its teacher has no KL term
    assert distillation_loss(teacher, teacher, labels, weight=1.0, temperature=3.0).item() == \
        pytest.approx(0.0, abs=1e-6)


def test_the_teacher_gets_no_gradient_and_never_changes():
    torch.manual_seed(0)
    student = models.build("vgg7", "coupled", width_mult=0.25, num_classes=10, in_channels=1)
    teacher = models.build("vgg7", "fp", width_mult=0.25, num_classes=10, in_channels=1)
    teacher.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    spec = DistillSection.model_validate({"teacher": {"stage": "t"}, "weight": 0.5,
                                          "temperature": 2.0})
    distiller = Distiller(teacher, spec, torch.float32, torch.device("cpu"), {})
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    images = torch.randn(8, 1, 32, 32)
    labels = torch.randint(0, 10, (8,))
    for _ in range(2):
        loss = distiller.loss(student(images), labels, images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training  # eval mode: its BN statistics stay
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    metrics = distiller.epoch_metrics(images=16, seconds=10.0)
    assert 0 < metrics["distill_teacher_seconds"] < 10.0
    assert metrics["images_per_second_without_teacher"] > 16 / 10.0


def _write(tmp_path: Path, fashion_mnist: Path, teacher: str, weight: str = "0.5") -> Path:
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(f"""\
name: tiny-kd
seed: 1
model:
  name: vgg7
  options: {{width_mult: 0.25, num_classes: 10, in_channels: 1}}
data: {{root: {fashion_mnist}, preset: small, channels: 1, batch_size: 64, train_subset: 256,
        val_subset: 101}}
stages:
  - {{name: teacher, variant: fp, epochs: 1, optimizer: {{lr: 0.05}}}}
  - name: student
    variant: coupled
    epochs: 1
    optimizer: {{lr: 0.05}}
    distill: {{teacher: {teacher}, weight: {weight}, temperature: 2.0}}
""")
    return recipe


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case", ["weight-above-1", "unknown-stage", "later-stage",
                                  "missing-checkpoint", "other-class-count",
                                  "code-running-checkpoint", "both-sources"])
def test_bad_teacher_input_is_refused_before_compute(case, tmp_path, fashion_mnist, capsys,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code-ran"
    fp10 = tmp_path / "fp10.pt"
    torch.save(models.build("vgg7", "fp", width_mult=0.25, num_classes=10,
                            in_channels=1).state_dict(), fp10)
    vgg = "{model: vgg7, variant: fp, options: {width_mult: 0.25, num_classes: 10, in_channels: 1}"
    teacher, weight, fragments = {
        "weight-above-1": ("{stage: teacher}", "1.5", ("stages.1.distill.weight",
                                                       "less than or equal to 1")),
        "unknown-stage": ("{stage: nope}", "0.5", ("stages.1.distill.teacher.stage",
                                                   "'nope' is not an earlier stage")),
        "later-stage": ("{stage: student}", "0.5", ("stages.1.distill.teacher.stage",
                                                    "not an earlier stage")),
        "missing-checkpoint": (vgg + ", checkpoint: nowhere.pt}", "0.5",
                               ("stages.1.distill.teacher.checkpoint", "nowhere.pt does not exist")),
        "other-class-count": ("{model: torchvision/resnet18, checkpoint: fp10.pt}", "0.5",
                              ("stages.1.distill.teacher.options", "the teacher has 1000 classes, "
                                                                   "the student 10")),
        "code-running-checkpoint": (vgg + ", checkpoint: evil.pt}", "0.5",
                                    ("stages.1.distill.teacher.checkpoint",
                                     "evil.pt is not a plain weights file")),
        "both-sources": ("{stage: teacher, model: vgg7, checkpoint: fp10.pt}", "0.5",
                         ("stages.1.distill.teacher", "one of them")),
    }[case]
    if case == "code-running-checkpoint":
        torch.save({"features.conv1.conv.weight": torch.zeros(1), "x": _Payload(marker)},
                   tmp_path / "evil.pt")
    recipe = _write(tmp_path, fashion_mnist, teacher, weight)
    code = main(["train", str(recipe), "--output", "out"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("binaryduo: error: "), err
    assert all(fragment in err[0] for fragment in fragments), err[0]
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_a_checkpoint_teacher_that_fits_passes(tmp_path, fashion_mnist, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(models.build("vgg7", "fp", width_mult=0.25, num_classes=10,
                            in_channels=1).state_dict(), tmp_path / "fp10.pt")
    recipe = _write(tmp_path, fashion_mnist, "{model: vgg7, variant: fp, options: {width_mult: "
                    "0.25, num_classes: 10, in_channels: 1}, checkpoint: fp10.pt}")
    assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err


@pytest.mark.slow
def test_a_stage_teacher_run_logs_its_provenance_and_cost(tmp_path, fashion_mnist,
                                                          run_binaryduo):
    recipe = _write(tmp_path, fashion_mnist, "{stage: teacher}")
    run_binaryduo("train", recipe, "--smoke", "--output", "run",
                  "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    student = client.get_run(state["stage_run_ids"]["student"])
    params, metrics = student.data.params, student.data.metrics
    checkpoint = Path(params["distill.teacher_checkpoint"])
    assert checkpoint.is_relative_to(tmp_path / "run" / "checkpoints" / "teacher")
    # the teacher's file is unchanged by the student's training: its hash is the logged one
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == params["distill.teacher_sha256"]
    teacher_top1 = client.get_run(state["stage_run_ids"]["teacher"]).data.metrics["val_top1"]
    assert float(params["distill.teacher_top1"]) == pytest.approx(teacher_top1, abs=1e-4)
    assert (params["distill.weight"], params["distill.temperature"]) == ("0.5", "2.0")
    assert params["distill.teacher"] == "stage teacher (best)"
    assert 0 < metrics["distill_teacher_fraction"] < 1
    assert metrics["images_per_second_without_teacher"] > metrics["images_per_second"]
