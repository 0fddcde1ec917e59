"""``data prepare`` / ``data check`` subcommands (trainer/cli/data.py), on real data."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest

from binaryduo.trainer.cli import data as commands_data
from binaryduo.trainer.cli.errors import UsageError


def run(argv):
    parser = argparse.ArgumentParser(prog="binaryduo")
    commands_data.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_prepare_then_noop(tmp_path, fashion_mnist_source, capsys):
    out = tmp_path / "fm"
    assert run(["data", "prepare", "fashion-mnist", str(out),
                "--source", str(fashion_mnist_source)]) == 0
    assert "60000 train, 10000 val" in capsys.readouterr().out
    assert run(["data", "prepare", "fashion-mnist", str(out)]) == 0
    assert "already complete" in capsys.readouterr().out


def test_prepare_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        run(["data", "prepare", "fashion-mnist", str(tmp_path / "x"), "--source",
             str(tmp_path)])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(UsageError, match="not a complete"):
        run(["data", "prepare", "fashion-mnist", str(tmp_path / "taken")])


def test_check_exit_status(imagenet_tree, tmp_path, capsys):
    assert run(["data", "check", str(imagenet_tree)]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    broken = tmp_path / "broken"
    shutil.copytree(imagenet_tree, broken)
    victim = sorted((broken / "val").rglob("*.JPEG"))[0]
    victim.write_bytes(victim.read_bytes()[:500])
    assert run(["data", "check", str(broken)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"truncated: {victim}: ") and len(lines) == 2
    assert run(["data", "check", str(broken), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["problems"][0]["path"] == str(victim)


def test_check_bad_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not a directory"):
        run(["data", "check", str(tmp_path / "missing")])
