"""Optimizer parameter groups, Adam/AdamW and the linear schedule (issue 18): every parameter in
exactly one role, the recipe's per-role weight decay and LR multiple reach the optimizer that
DeepSpeed steps (ZeRO 0 and 1, 2 gloo ranks), the defaults keep today's single group, and bad
settings are refused by the schema."""
from pathlib import Path

import pytest
import torch

from binaryduo import models
from binaryduo.trainer.recipe import OptimizerSection, ScheduleSection
from binaryduo.trainer.run.deepspeed_engine import make_optimizer, parameter_groups
from binaryduo.trainer.run.schedules import learning_rate

WORKER = Path(__file__).with_name("optimizer_groups_worker.py")

ARCHITECTURES = [(name, variant) for name in models.names() for variant in models.variants()]


def _small(name: str, variant: str) -> torch.nn.Module:
    return models.build(name, variant, num_classes=10, width_mult=0.25)


@pytest.mark.parametrize("name,variant", ARCHITECTURES)
def test_every_parameter_has_exactly_one_role(name, variant):
    model = _small(name, variant)
    roles = models.parameter_roles(model)
    assert tuple(roles) == models.PARAMETER_ROLES
    seen = [id(p) for named in roles.values() for _, p in named]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    binary = {id(m.weight) for m in model.modules() if isinstance(m, models.QConv2d)}
    assert {id(p) for _, p in roles["binary_layers"]} == binary and binary
    assert all(p.ndim == 1 for _, p in roles["norm_and_bias"])
    names = [n for n, _ in roles["full_precision"]]
    # the first conv and the classifier are FP (and ResNet's 1x1 shortcuts, where it has them)
    first = next(n for n, p in model.named_parameters() if p.ndim == 4)
    assert first in names and any(n.startswith("classifier") for n in names), names
    assert all(p.ndim > 1 for _, p in roles["full_precision"])


def test_without_groups_one_group_of_every_parameter_in_order():
    """Today's behaviour, bit for bit: weight decay on every parameter (the authors' setting)."""
    model = _small("vgg7", "coupled")
    spec = OptimizerSection(lr=0.1)
    (group,) = parameter_groups(model, spec)
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert group["weight_decay"] == 1e-4 and group["lr_mult"] == 1.0
    optimizer = make_optimizer(model, type("Stage", (), {"optimizer": spec})())
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4]


@pytest.mark.parametrize("name,kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_role_settings_reach_the_optimizer(name, kind):
    model = _small("resnet18", "decoupled")
    spec = OptimizerSection(name=name, lr=0.01, weight_decay=1e-5, groups={
        "binary_layers": {"weight_decay": 0.0}, "full_precision": {"lr_mult": 2.0}})
    optimizer = make_optimizer(model, type("Stage", (), {"optimizer": spec})())
    assert type(optimizer) is kind
    by_role = {g["role"]: g for g in optimizer.param_groups}
    assert set(by_role) == set(models.PARAMETER_ROLES)
    assert (by_role["binary_layers"]["weight_decay"], by_role["binary_layers"]["lr_mult"]) == (0.0, 1.0)
    # a role the recipe leaves out keeps the optimizer's decay
    assert by_role["norm_and_bias"]["weight_decay"] == 1e-5
    assert (by_role["full_precision"]["weight_decay"], by_role["full_precision"]["lr_mult"]) == (1e-5, 2.0)
    roles = models.parameter_roles(model)
    for role, group in by_role.items():
        assert [id(p) for p in group["params"]] == [id(p) for _, p in roles[role]]


def test_linear_schedule_falls_straight_to_zero_after_warm_up():
    linear = ScheduleSection(kind="linear", warmup_epochs=1)
    lrs = [learning_rate(linear, 0.2, step, 4, 3) for step in range(12)]
    assert lrs[:4] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    # 8 steps after warm-up: 0.2 * (1 - k/8)
    assert lrs[4:] == pytest.approx([0.2 * (1 - k / 8) for k in range(8)])
    assert learning_rate(linear, 0.2, 12, 4, 3) == 0.0


@pytest.mark.parametrize("settings,message", [
    ({"name": "sgd", "betas": [0.5, 0.9]}, "betas apply to adam/adamw only"),
    ({"name": "adam", "momentum": 0.5}, "momentum/nesterov apply to sgd only"),
    ({"name": "adamw", "nesterov": False}, "momentum/nesterov apply to sgd only"),
    ({"name": "adam", "betas": [0.9, 1.0]}, "betas must lie in [0, 1)"),
    ({"groups": {"binary": {}}}, "binary_layers"),
    ({"groups": {"binary_layers": {"lr_mult": 0}}}, "greater than 0"),
    ({"groups": {"norm_and_bias": {"weight_decay": -1}}}, "greater than or equal to 0"),
    ({"groups": {"norm_and_bias": {"decay": 0}}}, "Extra inputs are not permitted"),
])
def test_bad_optimizer_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        OptimizerSection(lr=0.1, **settings)


@pytest.mark.slow
def test_groups_reach_the_optimizer_deepspeed_steps_on_two_ranks(tmp_path, fashion_mnist,
                                                                 torchrun_worker):
    """ZeRO 0 and 1 on 2 gloo ranks: after 2 steps (LR 0.01, 0.02 from the schedule) each role's
    group holds the schedule's LR times its multiple and its own decay, and both ZeRO stages
    train the same weights."""
    ranks = torchrun_worker(WORKER, 2, "groups", fashion_mnist, tmp_path / "groups",
                            out=tmp_path / "groups")
    sizes = {role: sum(p.numel() for _, p in named) for role, named in models.parameter_roles(
        models.build("vgg7", "bnn", width_mult=0.25, num_classes=10, in_channels=1,
                     weight_bits=1)).items()}
    for rank, result in enumerate(ranks):
        for stage in ("0", "1"):
            run = result[stage]
            assert run["steps"] == 2
            got = {g["role"]: g for g in run["groups"]}
            assert set(got) == set(models.PARAMETER_ROLES), (rank, stage)
            assert got["binary_layers"]["lr"] == pytest.approx(0.02)
            assert got["norm_and_bias"]["lr"] == pytest.approx(0.01)  # lr_mult 0.5
            assert got["full_precision"]["lr"] == pytest.approx(0.02)
            assert [got[r]["weight_decay"] for r in models.PARAMETER_ROLES] == [0.0, 0.0, 0.05]
            assert all(g["betas"] == [0.8, 0.99] for g in got.values())
            if stage == "0":  # ZeRO 1 partitions the flat groups over the ranks
                assert {r: got[r]["numel"] for r in got} == sizes
        zero0, zero1 = result["0"]["weights"], result["1"]["weights"]
        assert zero0.keys() == zero1.keys()
        for name in zero0:
            assert zero1[name] == pytest.approx(zero0[name], rel=1e-5, abs=1e-6), name
    assert ranks[0]["0"]["weights"] == ranks[1]["0"]["weights"]  # the ranks agree
