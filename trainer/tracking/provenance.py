"""What produced a result: code version, package versions, hardware (saved with every run)."""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("binaryduo", "torch", "torchvision", "deepspeed", "nvidia-dali-cuda130", "mlflow",
            "pydantic", "pyyaml")
# The checkout's root when running from source (trainer/tracking/ -> the repository); in a wheel
# install, site-packages/binaryduo, which is not the top of any git work tree.
SOURCE_DIR = Path(__file__).resolve().parents[2]


def code_version() -> dict[str, object]:
    """Git SHA of the source tree and whether it has uncommitted changes; both None when the code
    does not run from its own checkout (a wheel install, no git)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(SOURCE_DIR), *args], capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # A wheel installed into a venv that lies inside some checkout would otherwise report that
    # checkout's commit, which says nothing about the installed code.
    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != SOURCE_DIR:
        return {"git_sha": None, "git_dirty": None}
    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


def code_version_tag(version: dict[str, object]) -> str:
    """The run's ``code_version`` tag: the commit (``-dirty`` with uncommitted changes), or the
    installed package's version where the code does not run from its checkout."""
    if version["git_sha"] is None:
        try:
            return f"binaryduo {metadata.version('binaryduo')} (installed)"
        except metadata.PackageNotFoundError:
            return "unknown"
    return f"{version['git_sha']}{'-dirty' if version['git_dirty'] else ''}"


def mlflow_standard_tags(version: dict[str, object], recipe_path, description: str
                         ) -> dict[str, str]:
    """MLflow's own run tags, beside binaryduo's: what the MLflow UI shows as a run's Source
    (the command and recipe; type JOB under Slurm, else LOCAL), its git commit, User and
    Description (the recipe's ``description``)."""
    tags = {"mlflow.source.name": f"binaryduo train {recipe_path}",
            "mlflow.source.type": "JOB" if os.environ.get("SLURM_JOB_ID") else "LOCAL"}
    if version["git_sha"] is not None:
        tags["mlflow.source.git.commit"] = str(version["git_sha"])
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # a container user without a name: MLflow shows none either
        pass
    if description.strip():
        tags["mlflow.note.content"] = description.strip()
    return tags


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware(world_size: int) -> dict[str, object]:
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "world_size": world_size,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "host": platform.node(),
    }


def recipe_hash(resolved: dict) -> str:
    """Stable hash of the resolved recipe; a resume refuses a run whose recipe changed."""
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
