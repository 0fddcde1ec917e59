"""Gradient-mismatch estimator (trainer/analysis/mismatch.py) and ``binaryduo analyze gradient-mismatch``."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binaryduo import models
from binaryduo.models.layers import ActQuant
from binaryduo.models.quantizers import quantize_activation
from binaryduo.trainer.cli import main as cli
from binaryduo.trainer.cli import analysis as commands_analysis
from binaryduo.trainer.analysis import mismatch
from binaryduo.trainer.analysis import mismatch_report as report

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to OpenMP spinning on a loaded
    machine (a 6-image VGG-7 forward took 9 ms with one thread, 450 ms with two, at load 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_vgg(levels, *, seed=0, variant="bnn", ste="clipped_identity"):
    torch.manual_seed(seed)
    opts = {"width_mult": 0.25, "weight_bits": 32, "in_channels": 1, "ste": ste}
    if levels == "fp":
        opts["act_bits"] = 32
    elif levels is not None:
        opts["act_levels"] = levels
    model = models.build("vgg7", variant, **opts)
    models.randomize_batchnorm_(model, torch.Generator().manual_seed(seed + 1))
    return model.to(F64).eval()


def batch(n=8, seed=0, channels=1, size=32, classes=10):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, channels, size, size, generator=g, dtype=F64),
            torch.randint(0, classes, (n,), generator=g))


def layer(model, short):
    return report.select_layers(mismatch.weight_layers(model), [short])[0]


def cdg(differences, delta):
    return differences.mean(dim=1) / (2 * delta)


# --- CDG against autograd on smooth networks ---------------------------------------------------
class SmoothNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, stride=2, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.Softplus()
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.act(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("estimator", ["naive", "batched"])
def test_cdg_matches_autograd_on_smooth_network(estimator):
    torch.manual_seed(0)
    model = SmoothNet()
    models.randomize_batchnorm_(model, torch.Generator().manual_seed(3))
    model = model.to(F64).eval()
    images, labels = batch(6, channels=2, size=8, classes=5)
    run = (mismatch.loss_differences_naive if estimator == "naive"
           else mismatch.loss_differences_batched)
    for target in mismatch.weight_layers(model):
        coords = mismatch.sample_coordinates(target.numel, 16, torch.Generator().manual_seed(1))
        grads = mismatch.ste_gradients(model, [target.param], images, labels)[target.param]
        estimate = cdg(run(model, target, coords, 1e-5, images, labels), 1e-5)
        assert mismatch.cosine(grads[0][coords], estimate) > 0.99999
        torch.testing.assert_close(estimate, grads[0][coords], rtol=1e-4, atol=1e-8)


def test_cdg_matches_autograd_on_fp_vgg():
    model = small_vgg(None, variant="fp")  # ReLU: smooth almost everywhere; small delta
    images, labels = batch(4)
    for short in ("conv2", "conv5", "classifier"):
        target = layer(model, short)
        coords = mismatch.sample_coordinates(target.numel, 16, torch.Generator().manual_seed(2))
        grads = mismatch.ste_gradients(model, [target.param], images, labels)[target.param]
        estimate = cdg(mismatch.loss_differences_batched(model, target, coords, 1e-6, images,
                                                         labels), 1e-6)
        assert mismatch.cosine(grads[0][coords], estimate) > 0.99


# --- quantized: no threshold crossed -> CDG exactly zero ---------------------------------------
def _threshold_margin(model, module_name, images, levels):
    """Smallest distance of any pre-activation after ``module_name``'s block to a threshold, and
    the largest factor by which a unit weight change can move one
    (max|input| x max|gamma/sigma|)."""
    block = model.get_submodule(module_name.rsplit(".", 1)[0])
    seen = {}
    hooks = [block.bn.register_forward_hook(lambda m, a, out: seen.update(y=out)),
             block.conv.register_forward_hook(lambda m, a, out: seen.update(x=a[0]))]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    thresholds = (torch.arange(levels, dtype=F64) + 0.5) / levels
    margin = (seen["y"].unsqueeze(-1) - thresholds).abs().min()
    bn = block.bn
    gain = (bn.weight.abs() / (bn.running_var + bn.eps).sqrt()).max()
    return float(margin), float(seen["x"].abs().max() * gain.detach())


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_cdg_is_zero_when_no_threshold_is_crossed(levels):
    model = small_vgg(levels)
    images, labels = batch(6)
    target = layer(model, "conv3")
    margin, gain = _threshold_margin(model, target.name, images, levels)
    delta = 0.5 * margin / gain  # no pre-activation can move by more than half the margin
    coords = mismatch.sample_coordinates(target.numel, 24, torch.Generator().manual_seed(0))
    naive = mismatch.loss_differences_naive(model, target, coords[:4], delta, images, labels)
    differences = mismatch.loss_differences_batched(model, target, coords, delta, images, labels)
    assert torch.count_nonzero(naive) == 0 and torch.count_nonzero(differences) == 0
    grads = mismatch.ste_gradients(model, [target.param], images, labels)[target.param]
    record = mismatch.layer_mismatch(activation="q", ste="clipped_identity", layer=target,
                                     coordinates=coords, differences=differences, delta=delta,
                                     gradients=grads)
    assert record.crossed == 0 and math.isnan(record.cosine) and record.ste_rms > 0
    # a large step does cross thresholds
    bigger = mismatch.loss_differences_batched(model, target, coords, 0.5, images, labels)
    assert torch.count_nonzero(bigger) > 0


# --- STE gradient against a hand-derived two-layer case ----------------------------------------
def _analytic_ste(shape, z, levels=1, beta=5.0):
    if shape == "clipped_identity":
        return ((z > 0) & (z < 1)).to(z.dtype)
    if shape == "approxsign":  # binary: a triangle of peak 2 on (0, 1) centred on 1/2
        return torch.where((z > 0) & (z < 1), 2 - 4 * (z - 0.5).abs(), torch.zeros_like(z))
    x = 2 * (z - 0.5)  # swishsign, binary: one bump at the threshold 1/2
    return beta * (2 - beta * x * torch.tanh(beta * x / 2)) / (1 + torch.cosh(beta * x))


@pytest.mark.parametrize("shape", ["clipped_identity", "approxsign", "swishsign"])
def test_ste_gradient_equals_hand_derivation(shape):
    g = torch.Generator().manual_seed(5)
    w1 = torch.randn(7, 4, generator=g, dtype=F64) * 0.6
    w2 = torch.randn(3, 7, generator=g, dtype=F64)
    x = torch.randn(10, 4, generator=g, dtype=F64) + 0.5
    labels = torch.randint(0, 3, (10,), generator=g)
    model = nn.Sequential(nn.Linear(4, 7, bias=False), ActQuant(1, shape),
                          nn.Linear(7, 3, bias=False)).to(F64)
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[2].weight.copy_(w2)
    z = x @ w1.T
    a = (z >= 0.5).to(F64)
    p = torch.softmax(a @ w2.T, dim=1)
    dlogits = (p - F.one_hot(labels, 3).to(F64)) / x.shape[0]
    dz = (dlogits @ w2) * _analytic_ste(shape, z)
    expected = dz.T @ x
    grads = mismatch.ste_gradients(model, ["0.weight", "2.weight"], x, labels)
    torch.testing.assert_close(grads["0.weight"][0], expected.flatten(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads["2.weight"][0], (dlogits.T @ a).flatten(), rtol=1e-12,
                               atol=1e-14)
    # the halves are the gradients of the two halves' mean losses (5 samples each)
    assert torch.allclose((grads["0.weight"][1] + grads["0.weight"][2]) / 2, grads["0.weight"][0])
    assert not torch.allclose(grads["0.weight"][1], grads["0.weight"][2])


# --- batched estimator == naive loop ----------------------------------------------------------
@pytest.mark.parametrize("levels", [1, 2, 3, "fp"])
def test_batched_equals_naive_loop(levels):
    model = small_vgg(levels)
    images, labels = batch(6)
    nonzero = 0
    for target in mismatch.weight_layers(model):
        coords = mismatch.sample_coordinates(target.numel, 6, torch.Generator().manual_seed(4))
        delta = 0.5 * float(model.get_parameter(target.param).detach().pow(2).mean().sqrt())
        naive = mismatch.loss_differences_naive(model, target, coords, delta, images, labels)
        fast = mismatch.loss_differences_batched(model, target, coords, delta, images, labels,
                                                 chunk_size=5)
        torch.testing.assert_close(fast, naive, rtol=1e-9, atol=1e-12)
        nonzero += int(torch.count_nonzero(naive))
    assert nonzero > 20  # thresholds were crossed: the comparison is not between zeros


def test_batched_equals_naive_on_resnet_with_shortcuts():
    torch.manual_seed(0)
    model = models.build("resnet18", "bnn", width_mult=0.125, weight_bits=32, input_size=32,
                         num_classes=4)
    models.randomize_batchnorm_(model, torch.Generator().manual_seed(2))
    model = model.to(F64).eval()
    images, labels = batch(3, channels=3, classes=4)
    layers = mismatch.weight_layers(model)
    names = [layers[1].name, next(l.name for l in layers if "downsample" in l.name or
                                  "shortcut" in l.name), layers[-1].name]
    for target in report.select_layers(layers, names):
        coords = mismatch.sample_coordinates(target.numel, 4, torch.Generator().manual_seed(1))
        naive = mismatch.loss_differences_naive(model, target, coords, 0.05, images, labels)
        fast = mismatch.loss_differences_batched(model, target, coords, 0.05, images, labels)
        torch.testing.assert_close(fast, naive, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("levels", [1, 2, 3, 7])
def test_forward_only_staircase_is_bit_identical(levels, dtype):
    g = torch.Generator().manual_seed(levels)
    thresholds = (torch.arange(levels, dtype=F64) + 0.5) / levels
    edges = thresholds.to(dtype)
    y = torch.cat([torch.rand(4000, generator=g, dtype=F64).to(dtype) * 1.6 - 0.3, edges,
                   torch.nextafter(edges, torch.full_like(edges, -1)),
                   torch.nextafter(edges, torch.full_like(edges, 2)),
                   torch.tensor([0.0, 1.0, -0.0], dtype=dtype)])
    expected = quantize_activation(y, levels)
    assert torch.equal(mismatch.staircase(y, levels), expected)
    copy = mismatch.forward_only_copy(small_vgg(levels))
    assert not any(isinstance(m, ActQuant) for m in copy.modules())


# --- the study and the command ----------------------------------------------------------------
def test_run_mismatch_is_deterministic_and_complete():
    images, labels = batch(6)
    state = small_vgg(1).state_dict()

    def build(activation, ste):
        model = models.build("vgg7", "bnn", width_mult=0.25, weight_bits=32, in_channels=1,
                             **activation.options, ste=ste)
        model.load_state_dict(state)
        return model.to(F64)

    activations = [report.parse_activation(a) for a in ("fp", "2-bit", "binary")]
    settings = report.Settings(coordinates=6, delta=0.5, seed=3)
    first = report.run_mismatch(build, activations, ["clipped_identity", "swishsign"], images,
                                labels, settings, layers=["conv2", "classifier"])
    second = report.run_mismatch(build, activations, ["clipped_identity", "swishsign"], images,
                                 labels, settings, layers=["conv2", "classifier"])
    assert [r.to_dict() for r in first.records] == [r.to_dict() for r in second.records]
    assert first.rows() == [("fp", "exact"), ("2-bit", "clipped_identity"),
                            ("2-bit", "swishsign"), ("binary", "clipped_identity"),
                            ("binary", "swishsign")]
    by = {(r.activation, r.ste, report.short_name(r.layer)): r for r in first.records}
    # after the last quantized activation the STE gradient is exact: CDG agrees for every type
    for row in first.rows():
        assert by[(*row, "classifier")].cosine > 0.99
    # the forward (so the CDG) is shared by the STE shapes of one activation type
    assert by[("binary", "clipped_identity", "conv2")].cdg_rms == \
        by[("binary", "swishsign", "conv2")].cdg_rms
    assert "conv2" in first.format_table() and "classifier" in first.format_table()


@pytest.mark.parametrize("extra,message", [
    (["--activations", "fp,quaternary"], "unknown activation type 'quaternary'"),
    (["--delta", "0"], "delta 0.0: must be a positive number"),
    (["--delta", "-0.1"], "delta -0.1: must be a positive number"),
    (["--checkpoint", "/nonexistent/run"], "--checkpoint /nonexistent/run: no such file"),
    (["--stes", "clipped,approxsign"], "unknown STE shape 'clipped'"),
    (["--coordinates", "1"], "coordinates 1: need at least 2"),
    (["-O", "weight_bits=1", "--layers", "conv2"], "has binary weights"),
    (["--variant", "decoupled"], "activation fp: a decoupled 'vgg7' is binary by construction"),
    (["--layers", "conv9"], "unknown layer(s) conv9"),
    (["--data", "/nonexistent/data"], "--data /nonexistent/data: not a directory"),
])
def test_cli_bad_input_is_one_line_exit_2_before_compute(extra, message, tmp_path, monkeypatch,
                                                         capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("compute started")

    monkeypatch.setattr(mismatch, "ste_gradients", forbidden)
    monkeypatch.setattr(mismatch, "loss_differences_batched", forbidden)
    monkeypatch.setattr(commands_analysis, "_fixed_batch", forbidden)
    base = ["analyze", "gradient-mismatch", "--model", "vgg7", "--data", str(tmp_path)]
    status = cli.main(base + extra)
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("binaryduo: error: ") and message in err, err


def test_cli_unreadable_checkpoint(tmp_path, capsys):
    bad = tmp_path / "model_state.pt"
    bad.write_text("not a torch file")
    status = cli.main(["analyze", "gradient-mismatch", "--model", "vgg7", "--checkpoint", str(bad),
                       "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("binaryduo: error: --checkpoint") and \
        "cannot be read" in err


def _fake_run(tmp_path, state):
    run = tmp_path / "run"
    epoch = run / "checkpoints" / "bnn" / "epoch-0002"
    epoch.mkdir(parents=True)
    (run / "checkpoints" / "bnn" / "epoch-0001").mkdir()
    torch.save(state, epoch / "model_state.pt")
    (run / "checkpoints" / "bnn" / "manifest.json").write_text(json.dumps(
        {"epochs": [{"epoch": 2, "tag": "epoch-0002", "top1": 50.0}], "latest": "epoch-0002",
         "best": {"epoch": 2, "tag": "epoch-0002", "top1": 50.0}}))
    (run / "recipe.resolved.yaml").write_text(
        "name: t\nmodel:\n  name: vgg7\n  options: {width_mult: 0.25, weight_bits: 32, "
        "in_channels: 1}\ndata:\n  root: DATA\n  preset: small\nstages:\n- name: bnn\n"
        "  variant: bnn\n")
    return run


def test_checkpoint_resolution(tmp_path):
    run = _fake_run(tmp_path, {"x": torch.zeros(1)})
    model_file = run / "checkpoints" / "bnn" / "epoch-0002" / "model_state.pt"
    for given in (run, run / "checkpoints" / "bnn", model_file.parent, model_file):
        path, recipe, stage = commands_analysis.resolve_checkpoint(str(given), None)
        assert path == model_file and recipe["model"]["name"] == "vgg7" and stage == "bnn"
    with pytest.raises(cli.UsageError, match="not a stage"):
        commands_analysis.resolve_checkpoint(str(run), "finetune")


@pytest.mark.slow
def test_cli_end_to_end_on_fashion_mnist(tmp_path, fashion_mnist, capsys):
    """A trained-checkpoint layout, real data, JSON + PNG + MLflow, and the same numbers twice."""
    torch.manual_seed(0)
    model = models.build("vgg7", "bnn", width_mult=0.25, weight_bits=32, in_channels=1)
    run = _fake_run(tmp_path, model.state_dict())
    recipe = run / "recipe.resolved.yaml"
    recipe.write_text(recipe.read_text().replace("DATA", str(fashion_mnist)))
    db = tmp_path / "mlflow.db"
    args = ["analyze", "gradient-mismatch", "--checkpoint", str(run), "--batch", "12",
            "--coordinates", "6", "--layers", "conv2,classifier", "--activations", "fp,binary",
            "--stes", "clipped_identity,approxsign"]
    outputs = []
    for index in range(2):
        extra = ["--output-json", str(tmp_path / f"out{index}.json"),
                 "--plot", str(tmp_path / f"plot{index}.png")]
        if index == 1:
            extra += ["--json", "--tracking-uri", f"sqlite:///{db}"]
        assert cli.main(args + extra) == 0
        outputs.append(capsys.readouterr().out)
    first = json.loads((tmp_path / "out0.json").read_text())
    second = json.loads(outputs[1])
    assert first["records"] == second["records"]  # deterministic
    assert {(r["activation"], r["ste"]) for r in first["records"]} == {
        ("fp", "exact"), ("binary", "clipped_identity"), ("binary", "approxsign")}
    assert first["context"]["batch"] == 12 and first["context"]["bn_mode"] == "eval"
    assert "cosine(STE gradient, CDG)" in outputs[0]
    assert (tmp_path / "plot0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("gradient-mismatch")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.data.metrics["cosine.fp.exact.classifier"] == pytest.approx(
        next(r["cosine"] for r in first["records"]
             if r["activation"] == "fp" and r["layer"] == "classifier"))
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert artifacts == {"gradient_mismatch.json", "gradient_mismatch.txt",
                         "gradient_mismatch.png"}
