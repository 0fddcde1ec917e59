"""The repository stands on its own: no tracked file points into the team's internal notes folder,
which a user of the repository does not have (cite docs/method.md, docs/dependencies.md or the
paper instead)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Built from pieces so that this file does not match itself.
NEEDLE = "shar" + "ed/"


def tracked_files() -> list[str]:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True,
                              check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout: {error}")
    return [name for name in done.stdout.decode().split("\0") if name]


def test_no_tracked_file_mentions_the_internal_notes_folder():
    files = tracked_files()
    assert files, "git ls-files listed nothing"
    hits = []
    for name in files:
        path = REPO / name
        if not path.is_file():  # deleted in the work tree, not yet in the index
            continue
        for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
            if NEEDLE in line:
                hits.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not hits, "files citing a folder users do not have:\n" + "\n".join(hits)
