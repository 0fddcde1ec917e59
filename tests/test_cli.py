"""The installed ``binaryduo`` command: report, analyze decoupling, and one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).with_name("binaryduo")


def run(*args, cwd=None):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_report_json_matches_paper():
    result = run("report", "alexnet", "--variant", "decoupled", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["mbit"] == pytest.approx(189.4, abs=0.1)
    assert data["flops"] / 1e6 == pytest.approx(119.0, abs=0.1)
    assert data["mbit_weights_only"] == pytest.approx(188.7, abs=0.1)
    assert data["binary_macs"] > data["fp_macs"] > 0


def test_report_table_and_options():
    result = run("report", "vgg7", "--variant", "bnn", "-O", "width_mult=0.5", "-O", "weight_bits=32")
    assert result.returncode == 0, result.stderr
    assert "features.conv2.conv" in result.stdout and "32->32 3x3/1" in result.stdout
    assert "Mbit" in result.stdout and "FLOPs" in result.stdout


def test_report_all_lists_every_model_and_variant():
    result = run("report", "--all")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert {(r[0], r[1]) for r in rows} == {
        (m, v) for m in ("alexnet", "resnet18", "resnet18_sc", "vgg7")
        for v in ("fp", "bnn", "coupled", "decoupled")}
    assert "189.4 / 119.0" in result.stdout


def test_analyze_decoupling_passes():
    result = run("analyze", "decoupling", "vgg7", "resnet18", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["model"], r["mode"]) for r in rows] == [
        ("vgg7", "eval"), ("vgg7", "train"), ("resnet18", "eval"), ("resnet18", "train")]
    assert all(r["max_abs_dlogit"] <= 1e-9 and r["changed_predictions"] == 0 for r in rows)


def test_analyze_decoupling_fails_loudly_when_tolerance_cannot_hold():
    result = run("analyze", "decoupling", "vgg7", "--tolerance", "-1")
    assert result.returncode == 1
    assert "FAILED" in result.stdout and "not exact for vgg7" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["report", "vgg9"], "unknown model 'vgg9'; valid models: alexnet, resnet18, resnet18_sc, vgg7"),
    (["report", "vgg7", "-O", "width=2"], "unknown option(s) width for model 'vgg7'"),
    (["report", "vgg7", "-O", "weight_bits"], "expected KEY=VALUE"),
    (["report", "vgg7", "-O", "weight_bits=3"], "weight_bits=3 must be 1 or 32"),
    (["report"], "give a MODEL"),
    (["report", "vgg7", "--all"], "not both"),
    (["analyze", "decoupling", "lenet"], "unknown model 'lenet'"),
    (["analyze", "decoupling", "--batch", "0"], "--batch 0"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("binaryduo: error: ")
    assert message in lines[0]
    assert result.stdout == ""


def test_unknown_command_and_variant_exit_2():
    assert run("frobnicate").returncode == 2
    assert run("report", "vgg7", "--variant", "ternary").returncode == 2


def test_packages_install_under_binaryduo_only(tmp_path):
    """No generic top-level ``models``/``data``/``trainer`` packages leak into site-packages."""
    code = ("import importlib.util as u, json; "
            "print(json.dumps({n: u.find_spec(n) is not None for n in "
            "['models', 'data', 'trainer', 'binaryduo.models', 'binaryduo.data', "
            "'binaryduo.trainer']}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      cwd=tmp_path, env=env, check=True).stdout)
    assert found == {"models": False, "data": False, "trainer": False, "binaryduo.models": True,
                     "binaryduo.data": True, "binaryduo.trainer": True}
