"""Health metrics of binary networks (issue 17), the pure-model part: each metric against a hand
computation on a tiny layer, the exact level counts, the decoupled/coupled correspondence, and no
host read in the per-step path."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from binaryduo import models
from binaryduo.models import health
from binaryduo.models.health import HealthProbe, activation_health, layer_name
from binaryduo.models.layers import ActQuant, QConv2d
from binaryduo.trainer.runtime.host_syncs import count_host_syncs

#: pre-activations and the ternary level / STE window each one gets (ties go up; window 0<y<1)
Y = [-0.5, 0.0, 0.1, 0.2499, 0.25, 0.5, 0.7499, 0.75, 0.99, 1.0, 1.5, 0.6]
TERNARY = [0, 0, 0, 0, .5, .5, .5, 1, 1, 1, 1, .5]
BINARY = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
WINDOW = [0 < y < 1 for y in Y]


class Scaled(nn.Module):
    """y = s * x -> ActQuant: the activation sees ``x`` exactly (s = 1) and has a gradient path."""

    def __init__(self, levels: int):
        super().__init__()
        self.s = nn.Parameter(torch.ones(()))
        self.act = ActQuant(levels)

    def forward(self, x):
        return self.act(self.s * x)


def _run(probe: HealthProbe, model: nn.Module, x: torch.Tensor, step: int = 0) -> None:
    probe.step_started(step)
    model(x).sum().backward()
    probe.after_backward()
    probe.after_step()


@pytest.mark.parametrize("levels, expected", [(2, TERNARY), (1, BINARY)])
@pytest.mark.parametrize("grad", [True, False])
def test_occupancy_and_ste_coverage_of_a_known_input(levels, expected, grad):
    model = Scaled(levels)
    model.s.requires_grad_(grad)  # without a gradient path the window is computed from y
    probe = HealthProbe(model)
    probe.start_epoch()
    x = torch.tensor(Y).reshape(1, 3, 2, 2)
    probe.step_started(0)
    model(x)
    probe.after_step()
    metrics = probe.summarize(probe.totals().tolist())
    n = len(Y)
    assert metrics["health/act/ste_coverage"] == sum(WINDOW) / n
    levels_seen = sorted({0, *[i / levels for i in range(1, levels + 1)]})
    for level in levels_seen:
        assert metrics[f"health/act/occupancy_{level:g}"] == expected.count(level) / n, level
    assert sum(v for k, v in metrics.items() if "occupancy" in k) == pytest.approx(1.0)


def test_counts_accumulate_over_recorded_steps_only():
    model = Scaled(2)
    probe = HealthProbe(model, every=2)
    probe.start_epoch()
    x = torch.tensor(Y).reshape(1, 3, 2, 2)
    for step in range(4):       # steps 0 and 2 recorded
        _run(probe, model, x if step % 2 == 0 else torch.full_like(x, 0.6), step)
    totals = probe.totals().tolist()
    assert probe.steps == 2 and probe.seen == [2 * len(Y)]
    metrics = probe.summarize(totals)
    assert metrics["health/act/occupancy_0.5"] == TERNARY.count(.5) / len(Y)


def _conv_model(weight: torch.Tensor, weight_bits: int = 1) -> nn.Module:
    conv = QConv2d(weight.shape[1], weight.shape[0], 1, weight_bits=weight_bits)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return nn.Sequential(conv, ActQuant(2))


def test_flips_alpha_and_grad_norm_of_a_known_weight_change():
    w0 = torch.tensor([0.5, -0.25, 0.0, -0.0, 0.75, -1.0, 0.125, 0.3]).reshape(4, 2, 1, 1)
    w1 = torch.tensor([-0.5, -0.25, -1e-3, 0.2, 0.75, 1.0, 0.125, 0.3]).reshape(4, 2, 1, 1)
    w2 = torch.tensor([0.5, -0.25, -1e-3, 0.2, 0.75, 1.0, 0.125, -0.3]).reshape(4, 2, 1, 1)
    # signs (s(0) = s(-0) = +1): w0 + - + + + - + +; w1 - - - + + + + +; w2 + - - + + + + -
    model = _conv_model(w0)
    conv = model[0]
    probe = HealthProbe(model)
    probe.start_epoch()
    g1 = torch.arange(8.0).reshape(4, 2, 1, 1)
    g2 = torch.full((4, 2, 1, 1), 0.5)
    for step, (new, grad) in enumerate([(w1, g1), (w2, g2)]):
        probe.step_started(step)
        conv.weight.grad = grad.clone()       # what backward + the optimizer would do
        probe.after_backward()
        with torch.no_grad():
            conv.weight.copy_(new)
        probe.after_step()
    metrics = probe.summarize(probe.totals().tolist())
    assert metrics["health/0/flip_ratio_step"] == pytest.approx((3 / 8 + 2 / 8) / 2)
    # since the epoch start: w2 vs w0 differ at indices 2 and 5 and 7 (index 0 flipped back)
    assert metrics["health/0/flip_ratio"] == 3 / 8
    assert metrics["health/0/alpha"] == pytest.approx(float(w2.abs().mean()))
    assert metrics["health/0/grad_norm"] == pytest.approx((float(g1.norm()) + float(g2.norm())) / 2)


def test_fp_weights_have_no_alpha_and_missing_gradients_no_norm():
    model = _conv_model(torch.ones(2, 2, 1, 1), weight_bits=32)
    probe = HealthProbe(model)
    probe.start_epoch()
    probe.step_started(0)
    probe.after_backward()   # no .grad (DeepSpeed ZeRO >= 1 moves them away)
    probe.after_step()
    metrics = probe.summarize(probe.totals().tolist())
    assert "health/0/alpha" not in metrics and "health/0/grad_norm" not in metrics
    assert metrics["health/0/flip_ratio"] == 0.0


def test_metric_choice_and_distributed_sums():
    model = _conv_model(torch.ones(2, 2, 1, 1))
    probe = HealthProbe(model, metrics=["alpha", "ste_coverage"])
    probe.start_epoch()
    x = torch.tensor(Y[:8]).reshape(1, 2, 2, 2)
    _run(probe, model, x)
    one = probe.totals()
    keys = set(probe.summarize(one.tolist()))
    assert keys == {"health/0/alpha", "health/1/ste_coverage"}
    # two ranks with the same batch: same coverage, weight values divided back
    assert probe.summarize((2 * one).tolist(), world_size=2) == probe.summarize(one.tolist())
    with pytest.raises(ValueError, match="unknown health metrics"):
        HealthProbe(model, metrics=["flips"])


def test_level_counts_are_exact_beyond_float32_partial_sums(monkeypatch):
    monkeypatch.setattr(health, "_EXACT_CHUNK", 5)
    out = torch.tensor([0, .5, 1, 1, .5, .5, 0, 1, 1, 1, .5, 0, 0])
    assert health.level_counts(out, 2).tolist() == [4, 5]
    assert health.level_counts((out == 1).float(), 1).tolist() == [5]
    assert health.level_counts(torch.tensor([0, 1 / 3, 2 / 3, 1, 1]), 3).tolist() == [1, 1, 2]


def test_sign_packing_round_trip():
    like = [torch.randn(3, 5), torch.randn(7)]
    signs = [t >= 0 for t in like]
    packed = health.pack_signs(signs)
    assert packed.dtype == torch.uint8 and packed.numel() == 3
    assert all(torch.equal(a, b) for a, b in zip(health.unpack_signs(packed, like), signs))


def test_state_round_trip_continues_the_same_sums():
    torch.manual_seed(0)
    model = models.build("vgg7", "coupled", width_mult=0.125, num_classes=10, in_channels=1)
    x = torch.randn(4, 1, 32, 32)
    probe = HealthProbe(model)
    probe.start_epoch()
    _run(probe, model, x)
    saved, reference = probe.state_dict(), probe.reference_state()
    other = HealthProbe(copy.deepcopy(model))
    other.start_epoch()
    other.load_state_dict(saved)
    other.load_reference(reference)
    assert torch.equal(other.totals(), probe.totals())


def test_layer_names_read_well():
    assert layer_name("features.conv3.act") == "conv3"
    assert layer_name("features.conv3.conv") == "conv3"
    assert layer_name("units.4.branch.conv1") == "unit4.conv1"
    assert layer_name("units.0.branch.act2") == "unit0.act2"
    assert layer_name("features.fc6.conv") == "fc6"


def test_the_step_path_reads_nothing_on_the_host():
    torch.manual_seed(0)
    model = models.build("vgg7", "coupled", width_mult=0.125, num_classes=10, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = HealthProbe(model)
    probe.start_epoch()
    x, labels = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    with count_host_syncs("cpu") as reads:
        for step in range(3):
            probe.step_started(step)
            loss = nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            probe.after_backward()
            optimizer.step()
            optimizer.zero_grad()
            probe.after_step()
        probe.totals()
    assert reads.calls == [], reads.calls


def test_health_does_not_change_training():
    def train(with_probe: bool):
        torch.manual_seed(0)
        model = models.build("vgg7", "coupled", width_mult=0.125, num_classes=10, in_channels=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        probe = HealthProbe(model) if with_probe else None
        if probe:
            probe.start_epoch()
        generator = torch.Generator().manual_seed(1)
        for step in range(3):
            x = torch.randn(4, 1, 32, 32, generator=generator)
            labels = torch.randint(0, 10, (4,), generator=generator)
            if probe:
                probe.step_started(step)
            nn.functional.cross_entropy(model(x), labels).backward()
            if probe:
                probe.after_backward()
            optimizer.step()
            optimizer.zero_grad()
            if probe:
                probe.after_step()
        return model.state_dict()

    on, off = train(True), train(False)
    assert all(torch.equal(on[k], off[k]) for k in off)


@pytest.mark.parametrize("name, options", [
    ("vgg7", {"width_mult": 0.25, "num_classes": 10, "in_channels": 1}),
    ("resnet18", {"width_mult": 0.125, "input_size": 32, "num_classes": 10})])
def test_a_ternary_half_is_exactly_one_binary_copy_at_one(name, options):
    """Decoupling, in float64 on one batch: at every coupled position the number of the two
    binary copies at 1 is twice the ternary level, so P(1/2) = P(exactly one copy at 1) and the
    decoupled P(1) is the coupled mean level; each copy's STE window is the coupled window
    shifted by -+1/4 (copy 0 sees y - 1/4, copy 1 y + 1/4)."""
    torch.manual_seed(3)
    coupled = models.build(name, "coupled", **options).to(torch.float64)
    models.randomize_batchnorm_(coupled, generator=torch.Generator().manual_seed(4))
    decoupled = models.decouple(coupled)
    batch = torch.randn(6, options.get("in_channels", 3), options.get("input_size", 32),
                        options.get("input_size", 32), dtype=torch.float64)
    ternary, t_out = activation_health(coupled, batch, keep_outputs=True)
    binary, b_out = activation_health(decoupled, batch, keep_outputs=True)
    assert ternary.keys() == binary.keys() and ternary
    for site, coupled_health in ternary.items():
        y, levels = t_out[site]
        pairs = health.decoupled_pair_counts(b_out[site][1])
        assert torch.equal(pairs, 2 * levels), site
        p = coupled_health.occupancy()
        q = binary[site].occupancy()
        n = coupled_health.numel
        assert int((pairs == 1).sum()) == coupled_health.counts[1], site
        assert q["1"] == pytest.approx(p["0.5"] / 2 + p["1"]), site
        shifted = int(((y > 0.25) & (y < 1.25)).sum() + ((y > -0.25) & (y < 0.75)).sum())
        assert binary[site].window == shifted and binary[site].numel == 2 * n, site
