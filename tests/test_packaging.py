"""A non-editable install works without the source tree: the wheel carries the recipes and the
sbatch template as package data, and the installed ``binaryduo`` finds them from any directory.

The wheel is installed into a fresh virtual environment that borrows the project venv's
dependencies (torch, DeepSpeed, DALI, MLflow: gigabytes, not reinstalled) through a ``.pth`` line.
A plain path line adds that site-packages folder to ``sys.path`` without running the ``.pth``
files inside it, so the editable install's import hook stays out and every ``binaryduo`` module
comes from the wheel (asserted below).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPES = ("fashion_mnist_vgg7_bnn.yaml", "fashion_mnist_vgg7_binaryduo.yaml")

pytestmark = pytest.mark.slow  # building, installing and starting the CLI: 15-30 s


def run(*command, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def source_copy(destination: Path) -> Path:
    """The files a commit of the work tree would hold (tracked, or new and not ignored).

    Building from a copy rather than from the checkout: an in-tree build reuses ``build/lib``,
    which keeps modules deleted from the source since the last build and would ship them."""
    listed = run("git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                 cwd=REPO)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():  # deleted in the work tree but still in the index: not shipped
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv, a working directory outside the source tree) with the wheel installed."""
    root = tmp_path_factory.mktemp("packaging")
    source = source_copy(root / "src")
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--no-index", "-w", root / "dist", source, cwd=root)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (root / "dist").glob("binaryduo-*.whl")

    venv = root / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    own_site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                        cwd=root).stdout.strip())
    project_site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (own_site / "project_dependencies.pth").write_text("".join(f"{p}\n" for p in project_site))
    # --ignore-installed: pip also sees the editable binaryduo through that path and must neither
    # skip the wheel as "already satisfied" nor try to uninstall the project's install.
    done = run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
               wheel, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return wheel, venv, elsewhere


def test_the_wheel_ships_every_recipe_and_the_sbatch_template(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in DEMO_RECIPES:
        assert f"binaryduo/recipes/demo/{recipe}" in names
    shipped = {n.removeprefix("binaryduo/") for n in names
               if n.startswith("binaryduo/recipes/") and n.endswith(".yaml")}
    in_source = {str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml")}
    assert shipped == in_source
    assert "binaryduo/slurm/binaryduo.sbatch" in names


PROBE = """
import json, importlib.resources as r
import binaryduo, binaryduo.trainer
from binaryduo.trainer.cli.demo import demo_recipe_dir
from binaryduo.trainer.tracking.provenance import code_version
print(json.dumps({
    "binaryduo_path": list(binaryduo.__path__),
    "trainer_file": binaryduo.trainer.__file__,
    "demo_recipes": sorted(str(p) for p in demo_recipe_dir().iterdir()),
    "template": r.files("binaryduo.slurm").joinpath("binaryduo.sbatch").read_text(),
    "code_version": code_version(),
}))
"""


def test_the_installed_package_is_the_wheel_and_finds_its_data(installed):
    _, venv, elsewhere = installed
    probe = run(venv / "bin" / "python", "-c", PROBE, cwd=elsewhere)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout.splitlines()[-1])
    site = venv / "lib"
    assert all(Path(p).is_relative_to(site) for p in found["binaryduo_path"]), found
    assert Path(found["trainer_file"]).is_relative_to(site), found["trainer_file"]
    assert sorted(Path(p).name for p in found["demo_recipes"]) == sorted(DEMO_RECIPES)
    assert all(Path(p).is_relative_to(site) for p in found["demo_recipes"])
    assert found["template"] == (REPO / "slurm" / "binaryduo.sbatch").read_text()
    # outside a checkout there is no commit to name, and asking git must not fail the run
    assert found["code_version"] == {"git_sha": None, "git_dirty": None}


def test_the_installed_command_validates_a_packaged_recipe_from_another_directory(installed):
    _, venv, elsewhere = installed
    locate = run(venv / "bin" / "python", "-c",
                 "import importlib.resources as r; "
                 "print(r.files('binaryduo.recipes') / 'demo' / 'fashion_mnist_vgg7_binaryduo.yaml')",
                 cwd=elsewhere)
    recipe = Path(locate.stdout.strip())
    assert recipe.is_relative_to(venv) and recipe.is_file(), locate.stdout + locate.stderr

    checked = run(venv / "bin" / "binaryduo", "validate", "--schema-only", recipe, cwd=elsewhere)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("ok: ") and "fashion_mnist_vgg7_binaryduo" in checked.stdout

    helped = run(venv / "bin" / "binaryduo", "demo", "--help", cwd=elsewhere)
    assert helped.returncode == 0 and "usage: binaryduo demo" in helped.stdout, helped.stderr


def test_slurm_submit_renders_the_packaged_template(installed):
    _, venv, elsewhere = installed
    recipe = (venv / "lib").glob("python3*/site-packages/binaryduo/recipes/demo/"
                                 "fashion_mnist_vgg7_bnn.yaml")
    rendered = run(venv / "bin" / "binaryduo", "slurm", "submit", next(recipe), "--nodes", "1",
                   "--gpus-per-node", "0", "--output", "runs/packaged", "--dry-run",
                   cwd=elsewhere)
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=1\n" in rendered.stdout
    assert not any(elsewhere.iterdir()), "a dry run wrote files"
