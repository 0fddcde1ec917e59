"""Crashes, corrupt checkpoints, a full disk, divergence and untrusted checkpoint files, on the
real command (tiny two-stage BinaryDuo recipe: coupled 2 epochs -> decouple -> fine-tune 1 epoch,
16 steps each, Fashion-MNIST, DALI CPU, DeepSpeed on gloo, MLflow sqlite).

Faults come from ``BINARYDUO_FAULT`` (binaryduo.trainer.runtime.faults): a real SIGKILL at a named point,
a checkpoint writer that fails half-way with ENOSPC, weights poisoned with NaN. The reference is an
uninterrupted run of the same seeded recipe; "bitwise" means every tensor of every final model
file is equal.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

FINAL = (("coupled", "epoch-0002"), ("finetune", "epoch-0001"))
#: A run directory written by the code before issue 12's restructure (its README says how).
LEGACY_RUN = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_run_ca633a7"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fashion_mnist, tiny_recipe_text, tiny_straight_run):
    """The recipe file every test reuses (its folder holds their runs and MLflow store), and
    the uninterrupted run (shared with the end-to-end test: tests/conftest.py)."""
    root = tmp_path_factory.mktemp("reference")
    recipe = root / "tiny.yaml"
    recipe.write_text(tiny_recipe_text.replace("DATA", str(fashion_mnist)))
    return recipe, tiny_straight_run.run


@pytest.fixture(scope="module")
def killed_after_coupled(reference, run_binaryduo):
    """A run killed (SIGKILL) right after the coupled stage's last checkpoint; tests damage
    copies of it."""
    recipe, _ = reference
    killed = run_binaryduo("train", recipe, "--output", "killed", cwd=recipe.parent,
                           check=False, env={"BINARYDUO_FAULT": "kill:after_checkpoint:coupled:2"})
    assert killed.returncode == -9
    assert not (recipe.parent / "killed" / "checkpoints" / "finetune").exists()
    return recipe.parent / "killed"


def copy_of(run: Path, name: str) -> Path:
    return Path(shutil.copytree(run, run.parent / name, symlinks=True))


def models_of(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {stage: torch.load(run / "checkpoints" / stage / tag / "model_state.pt",
                              weights_only=True) for stage, tag in FINAL}


def assert_bitwise_equal(run: Path, reference_run: Path) -> None:
    got, want = models_of(run), models_of(reference_run)
    for stage in want:
        assert got[stage].keys() == want[stage].keys()
        different = [k for k in want[stage] if not torch.equal(got[stage][k], want[stage][k])]
        assert not different, (stage, different[:5])
    for stage, _ in FINAL:  # and the record of the stage: same epochs, same numbers
        a = json.loads((run / "checkpoints" / stage / "manifest.json").read_text())
        b = json.loads((reference_run / "checkpoints" / stage / "manifest.json").read_text())
        assert a == b, stage


def assert_checkpoints_whole(run: Path) -> None:
    """Every checkpoint directory that is not ``.partial`` / ``.corrupt`` matches its
    checksums.json (hashed here, independently of the code under test), and the manifest names
    only such directories."""
    for stage_dir in (run / "checkpoints").glob("*"):
        for tag_dir in stage_dir.glob("epoch-*"):
            if tag_dir.name.endswith((".partial", ".corrupt")):
                continue
            record = json.loads((tag_dir / "checksums.json").read_text())
            files = {str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                     if p.is_file() and p.name != "checksums.json"}
            assert files == set(record), tag_dir
            for name, want in record.items():
                data = (tag_dir / name).read_bytes()
                assert len(data) == want["bytes"] and \
                    hashlib.sha256(data).hexdigest() == want["sha256"], tag_dir / name
        manifest = json.loads((stage_dir / "manifest.json").read_text())
        for tag in [manifest["latest"], *(e["tag"] for e in manifest["epochs"])]:
            assert (stage_dir / tag / "checksums.json").is_file(), (stage_dir, tag)


def stops_with_one_line(run_binaryduo, recipe: Path, output: str, fault: str) -> str:
    """Runs ``recipe`` into ``output`` with ``fault``; it must exit 1 with one error line."""
    result = run_binaryduo("train", recipe, "--output", output, cwd=recipe.parent, check=False,
                           env={"BINARYDUO_FAULT": fault})
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("binaryduo:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def parent_status(db: Path, run: Path) -> str:
    parent = json.loads((run / "run_state.json").read_text())["parent_run_id"]
    return MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(parent).info.status


def test_kill_9_at_every_point_then_resume_is_bitwise_identical(reference, run_binaryduo):
    recipe, straight = reference
    root = recipe.parent
    seed = int(os.environ.get("BINARYDUO_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"random kill steps from seed {seed} (rerun with BINARYDUO_TEST_SEED={seed})")
    faults = [f"kill:step:coupled:1:{rng.randint(1, 16)}",  # mid-step
              "kill:eval:coupled:2",                         # mid-evaluation
              "kill:checkpoint:coupled:2",                   # mid-checkpoint write
              "kill:manifest:coupled:2",                     # renamed, manifest not yet updated
              "kill:decouple:finetune:0",                    # at the decouple transition
              f"kill:step:finetune:1:{rng.randint(1, 16)}"]
    for number, fault in enumerate(faults):
        where = ("--output", "chain") if number == 0 else ("--resume", "chain")
        killed = run_binaryduo("train", recipe, *where, cwd=root, check=False,
                               env={"BINARYDUO_FAULT": fault})
        assert killed.returncode == -9, (fault, killed.returncode, killed.stderr[-2000:])
        if (root / "chain" / "checkpoints").exists():
            assert_checkpoints_whole(root / "chain")
    partial = root / "chain" / "checkpoints" / "coupled" / "epoch-0002.partial"
    finished = run_binaryduo("train", recipe, "--resume", "chain", cwd=root)
    assert "open the record" in finished.stdout
    assert not partial.exists()  # the write killed mid-way was cleared by the next save
    assert_checkpoints_whole(root / "chain")
    assert_bitwise_equal(root / "chain", straight)
    assert parent_status(root / "mlflow.db", root / "chain") == "FINISHED"
    # every resume went on in the same MLflow runs: one parent, one run per stage
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    parent = json.loads((root / "chain" / "run_state.json").read_text())["parent_run_id"]
    stages = client.search_runs([client.get_run(parent).info.experiment_id],
                                f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["stage"] for r in stages) == ["coupled", "finetune"]
    assert all(r.info.status == "FINISHED" for r in stages)


def test_truncated_latest_checkpoint_is_reported_and_the_previous_one_used(
        reference, killed_after_coupled, run_binaryduo):
    recipe, straight = reference
    run = copy_of(killed_after_coupled, "truncated")
    coupled = run / "checkpoints" / "coupled"
    victim = coupled / "epoch-0002" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])  # a cut-short copy
    resumed = run_binaryduo("train", recipe, "--resume", run.name, cwd=run.parent)
    assert "epoch-0002 is not usable: mp_rank_00_model_states.pt is" in resumed.stderr
    assert "truncated" in resumed.stderr
    assert "resuming stage 'coupled' from epoch-0001 instead" in resumed.stderr
    assert (coupled / "epoch-0002.corrupt").is_dir()  # kept for a post-mortem, never loaded
    assert_bitwise_equal(run, straight)


def test_corrupt_bytes_are_caught_by_the_checksum(reference, killed_after_coupled,
                                                  run_binaryduo):
    recipe, straight = reference
    run = copy_of(killed_after_coupled, "flipped")
    victim = run / "checkpoints" / "coupled" / "epoch-0002" / "model_state.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in a weight: torch.load would not notice
    victim.write_bytes(bytes(data))
    resumed = run_binaryduo("train", recipe, "--resume", run.name, cwd=run.parent)
    assert "model_state.pt does not match its SHA-256 (corrupt)" in resumed.stderr
    assert_bitwise_equal(run, straight)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(reference, run_binaryduo):
    recipe, straight = reference
    root = recipe.parent
    error = stops_with_one_line(run_binaryduo, recipe, "full", "disk_full:coupled:2")
    assert "checkpoint epoch-0002 of stage 'coupled' could not be written" in error
    assert "No space left on device" in error
    assert "the previous checkpoint epoch-0001 is intact" in error
    coupled = root / "full" / "checkpoints" / "coupled"
    assert sorted(p.name for p in coupled.iterdir()) == ["epoch-0001", "manifest.json"]
    assert json.loads((coupled / "manifest.json").read_text())["latest"] == "epoch-0001"
    assert_checkpoints_whole(root / "full")
    assert parent_status(root / "mlflow.db", root / "full") == "FAILED"
    run_binaryduo("train", recipe, "--resume", "full", cwd=root)  # room again: it finishes
    assert_bitwise_equal(root / "full", straight)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(reference, run_binaryduo):
    recipe, straight = reference
    root = recipe.parent
    error = stops_with_one_line(run_binaryduo, recipe, "nan", "nan:coupled:2:5")
    # poisoned after step 5's backward pass: step 6's loss is the first non-finite one
    assert "stage 'coupled' epoch 2: training loss is nan at step 6 of the epoch" in error
    assert "the run diverged and stops" in error and "epoch-0001 is kept" in error
    coupled = root / "nan" / "checkpoints" / "coupled"
    assert json.loads((coupled / "manifest.json").read_text())["latest"] == "epoch-0001"
    assert not (coupled / "epoch-0002").exists()
    assert_checkpoints_whole(root / "nan")
    assert parent_status(root / "mlflow.db", root / "nan") == "FAILED"
    # the checkpoint kept is the good one: it equals the uninterrupted run's epoch 1
    good = torch.load(coupled / "epoch-0001" / "model_state.pt", weights_only=True)
    want = torch.load(straight / "checkpoints" / "coupled" / "epoch-0001" / "model_state.pt",
                      weights_only=True)
    assert all(torch.equal(good[k], want[k]) and torch.isfinite(good[k].float()).all()
               for k in want)


def test_an_infinite_gradient_stops_the_run_like_a_nan_loss(reference, run_binaryduo):
    """An overflowing gradient with a finite loss (step 5 of epoch 2): the run stops at that
    step (no silent skip) with the divergence line, keeps epoch 1, FAILED."""
    recipe, straight = reference
    root = recipe.parent
    error = stops_with_one_line(run_binaryduo, recipe, "inf", "inf_grad:coupled:2:5")
    assert "stage 'coupled' epoch 2: the gradients are not finite (loss " in error
    assert "at step 5 of the epoch (global step 21)" in error
    assert "the run diverged and stops" in error and "epoch-0001 is kept" in error
    coupled = root / "inf" / "checkpoints" / "coupled"
    assert json.loads((coupled / "manifest.json").read_text())["latest"] == "epoch-0001"
    assert parent_status(root / "mlflow.db", root / "inf") == "FAILED"


def test_an_infinite_gradient_stops_a_zero1_bf16_run_too(reference, run_binaryduo):
    """ZeRO 1 keeps the reduced gradients in its optimizer's partitions, not in ``.grad``; the
    check reads them there (and DeepSpeed's own overflow skip never gets to skip silently)."""
    recipe, _ = reference
    result = run_binaryduo("train", recipe, "--output", "inf-z1", "--smoke", "--set",
                           "deepspeed.zero_stage=1", "--set", "precision=bf16", cwd=recipe.parent,
                           check=False, env={"BINARYDUO_FAULT": "inf_grad:coupled:1:2"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert ("stage 'coupled' epoch 1: the gradients are not finite (loss " in result.stderr and
            "at step 2 of the epoch" in result.stderr), result.stderr[-3000:]


class _Payload:
    """Unpickling this runs ``touch MARKER``: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(reference, killed_after_coupled,
                                                     run_binaryduo, tmp_path):
    recipe, _ = reference
    root = recipe.parent
    marker = tmp_path / "code-ran"
    run = copy_of(killed_after_coupled, "evil")
    tag = run / "checkpoints" / "coupled" / "epoch-0002"
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)
    states["payload"] = _Payload(marker)
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    record = json.loads((tag / "checksums.json").read_text())  # an attacker can rewrite these
    data = (tag / "mp_rank_00_model_states.pt").read_bytes()
    record["mp_rank_00_model_states.pt"] = {"bytes": len(data),
                                            "sha256": hashlib.sha256(data).hexdigest()}
    (tag / "checksums.json").write_text(json.dumps(record))
    refused = run_binaryduo("train", recipe, "--resume", run.name, cwd=root, check=False)
    assert refused.returncode == 1
    assert "mp_rank_00_model_states.pt: refusing to load" in refused.stderr
    assert "posix.system" in refused.stderr
    assert not marker.exists()

    # the same payload as a stage's init_from model file
    evil_model = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(1), "payload": _Payload(marker)}, evil_model)
    refused = run_binaryduo("train", recipe, "--output", "evil-init", "--smoke",
                            "--set", f"stages.0.init_from={evil_model}", cwd=root, check=False)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert f"{evil_model}: refusing to load" in refused.stderr
    assert not marker.exists()


def test_zero1_bf16_checkpoint_resumes_through_the_safe_loader(reference, tiny_zero1_bf16_smoke,
                                                              run_binaryduo):
    """ZeRO-1 optimizer states hold a few DeepSpeed data classes; the weights-only pre-check
    allows exactly those, and the resumed run equals the uninterrupted one (shared with the
    end-to-end test's bf16 + ZeRO-1 smoke: tests/conftest.py)."""
    recipe, _ = reference
    root = recipe.parent
    flags = ("--smoke", "--set", "deepspeed.zero_stage=1", "--set", "precision=bf16")
    straight = tiny_zero1_bf16_smoke.run
    killed = run_binaryduo("train", recipe, "--output", "z1", *flags, cwd=root, check=False,
                           env={"BINARYDUO_FAULT": "kill:after_checkpoint:coupled:1"})
    assert killed.returncode == -9
    optim = list((root / "z1" / "checkpoints" / "coupled" / "epoch-0001").glob("*optim_states.pt"))
    assert optim, "ZeRO-1 writes optimizer state files"
    run_binaryduo("train", recipe, "--resume", "z1", *flags, cwd=root)
    for stage in ("coupled", "finetune"):
        a = torch.load(root / "z1" / "checkpoints" / stage / "epoch-0001" / "model_state.pt",
                       weights_only=True)
        b = torch.load(straight / "checkpoints" / stage / "epoch-0001" / "model_state.pt",
                       weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in b), stage


def test_a_run_written_before_the_restructure_resumes_bitwise(reference, fashion_mnist,
                                                               run_binaryduo, tmp_path):
    """A checkpoint of commit ca633a7 (killed after the coupled stage's epoch 1, offline) is
    resumed by the current code: same recipe hash, the old checkpoint loaded (not retrained),
    and the same final weights as the uninterrupted run of the current code."""
    _, straight = reference
    work = Path(shutil.copytree(LEGACY_RUN, tmp_path / "legacy"))
    (work / "fashion-mnist").symlink_to(fashion_mnist)  # the recipe's relative data.root
    epoch1 = work / "run" / "checkpoints" / "coupled" / "epoch-0001"
    files_before = {p.name: p.stat().st_ino for p in epoch1.iterdir()}
    state_before = json.loads((work / "run" / "run_state.json").read_text())
    resumed = run_binaryduo("train", "tiny.yaml", "--resume", "run", "--offline", cwd=work)
    assert "[coupled] epoch 2/2" in resumed.stdout
    assert "[coupled] epoch 1/2" not in resumed.stdout  # epoch 1 came from the old checkpoint
    assert {p.name: p.stat().st_ino for p in epoch1.iterdir()} == files_before  # not rewritten
    state = json.loads((work / "run" / "run_state.json").read_text())
    assert state["recipe_hash"] == state_before["recipe_hash"]  # the move changed no recipe key
    assert state["parent_run_id"] == state_before["parent_run_id"]
    assert state["stage_run_ids"]["coupled"] == state_before["stage_run_ids"]["coupled"]
    assert state["completed"] == ["coupled", "finetune"]
    ours = torch.load(straight / "checkpoints" / "coupled" / "epoch-0001" / "model_state.pt",
                      weights_only=True)
    theirs = torch.load(epoch1 / "model_state.pt", weights_only=True)
    if any(not torch.equal(ours[k], theirs[k]) for k in ours):
        pytest.skip("bitwise part not checkable here: this machine's arithmetic gives other "
                    "epoch-1 weights than the machine that wrote the fixture (the checks above "
                    "passed); regenerate it (tests/fixtures/legacy_run_ca633a7/README.md)")
    assert_bitwise_equal(work / "run", straight)


def test_a_second_preemption_in_a_resumed_epoch_checkpoints_at_its_own_step(reference,
                                                                             run_binaryduo):
    """SIGTERM after step 3 of the first epoch, resume, SIGTERM again after step 6 of that same
    epoch, resume: the second checkpoint is taken at step 6 (the runner once counted the steps
    done before the resume twice and saved it as step 9, so the last resume skipped 3 steps), and
    the run ends bitwise equal to the uninterrupted one."""
    recipe, reference_run = reference
    run = recipe.parent / "preempted-twice"
    manifest = run / "checkpoints" / "coupled" / "manifest.json"
    for attempt, (flag, step) in enumerate([("--output", 3), ("--resume", 6)]):
        stopped = run_binaryduo("train", recipe, flag, run.name, cwd=recipe.parent, check=False,
                                env={"BINARYDUO_FAULT": f"signal:TERM:0:coupled:1:{step}"})
        assert stopped.returncode == 75, (attempt, stopped.stderr[-3000:])
        assert json.loads(manifest.read_text())["latest"] == f"epoch-0000-step-{step:06d}"
    run_binaryduo("train", recipe, "--resume", run.name, cwd=recipe.parent)
    assert_bitwise_equal(run, reference_run)
