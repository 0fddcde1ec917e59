"""Recipe schema and loading: every malformed recipe fails with one line naming file, line, key."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from binaryduo.trainer.recipe import RecipeError, ScheduleSection, load_recipe
from binaryduo.trainer.run.schedules import learning_rate

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).with_name("binaryduo")

GOOD = """\
name: tiny
seed: 3
model:
  name: vgg7
  options: {width_mult: 0.25, num_classes: 10}
data:
  root: DATA
  preset: small
  batch_size: 8
stages:
  - name: coupled
    variant: coupled
    epochs: 2
    optimizer: {lr: 0.1}
    schedule: {kind: step, milestones: [2]}
  - name: finetune
    variant: decoupled
    transition: decouple
    init_from: previous
    epochs: 1
    optimizer: {lr: 0.01}
"""


@pytest.fixture
def dataset(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "data" / split / "a").mkdir(parents=True)
    return tmp_path / "data"


def write(tmp_path, text, dataset=None):
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace("DATA", str(dataset or tmp_path / "missing")))
    return path


def test_good_recipe_loads(tmp_path, dataset):
    recipe = load_recipe(write(tmp_path, GOOD, dataset))
    assert [s.name for s in recipe.stages] == ["coupled", "finetune"]
    assert recipe.stages[1].init_checkpoint == "best"  # the authors' choice is the default
    assert recipe.stages[0].optimizer.nesterov and recipe.stages[0].optimizer.weight_decay == 1e-4


def test_overrides_are_typed_and_address_stages_by_name(tmp_path, dataset):
    recipe = load_recipe(write(tmp_path, GOOD, dataset),
                         ["stages.finetune.epochs=4", "stages.0.optimizer.lr=0.5", "seed=9",
                          "model.options.weight_bits=32"])
    assert recipe.stages[1].epochs == 4 and recipe.stages[0].optimizer.lr == 0.5
    assert recipe.seed == 9 and recipe.model.options["weight_bits"] == 32


def test_environment_references(tmp_path, dataset, monkeypatch):
    text = GOOD.replace("root: DATA", "root: ${TINY_ROOT}")
    path = write(tmp_path, text)
    monkeypatch.delenv("TINY_ROOT", raising=False)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert error.value.problems == [
        f"{path}:7: data.root: environment variable TINY_ROOT is not set (the recipe refers to "
        "${TINY_ROOT}; export it or use --set data.root=PATH)"]
    assert load_recipe(path, schema_only=True).data.root == "${TINY_ROOT}"
    monkeypatch.setenv("TINY_ROOT", str(dataset))
    assert load_recipe(path).data.root == str(dataset)
    with_default = write(tmp_path, GOOD.replace("root: DATA", "root: ${TINY_UNSET:-" + str(dataset) + "}"))
    assert load_recipe(with_default).data.root == str(dataset)


BAD = [  # (edit of GOOD, expected line, expected text)
    (("  batch_size: 8", "  batch_size: eight"), 9, "data.batch_size: Input should be a valid integer"),
    (("  batch_size: 8", "  batch_size: 0"), 9, "data.batch_size: Input should be greater than 0"),
    (("  batch_size: 8", "  batch_size: 8\n  batchsize: 8"), 10, "data.batchsize: unknown key"),
    (("seed: 3", "seed: 3\nseeds: 4"), 3, "seeds: unknown key"),
    (("    epochs: 2", "    epochs: -2"), 13, "stages.0.epochs: Input should be greater than 0"),
    (("    epochs: 2", "    epochs: '2'"), 13, "stages.0.epochs: Input should be a valid integer"),
    (("  name: vgg7", "  name: vgg9"), 4, "model.name: unknown model 'vgg9'"),
    (("{width_mult: 0.25, num_classes: 10}", "{width: 0.25}"), 5, "unknown option(s) width"),
    (("    variant: coupled", "    variant: ternary"), 12, "stages.0.variant: Input should be 'fp'"),
    (("    variant: coupled", "    variant: bnn"), 18, "decouple needs a coupled previous stage"),
    (("    transition: decouple\n", ""), 18, "stages.1.init_from: stage 'coupled' trains 'coupled'"),
    (("    init_from: previous\n", ""), 18, "decouple needs init_from: previous"),
    (("milestones: [2]", "milestones: [5]"), 11, "milestones [5] lie after"),
    (("milestones: [2]", "milestones: [2, 1]"), 15, "milestones must be increasing"),
    (("{lr: 0.1}", "{lr: -0.1}"), 14, "stages.0.optimizer.lr: Input should be greater than 0"),
    (("{lr: 0.1}", "{lr: 0.1, name: lamb}"), 14, "stages.0.optimizer.name: Input should be 'sgd'"),
    (("  preset: small", "  preset: tiny"), 8, "data.preset: Input should be 'imagenet' or 'small'"),
    (("  preset: small\n", ""), 6, "data.preset: required key is missing"),
    (("  - name: finetune", "  - name: coupled"), 16, "stages.1.name: duplicate stage name"),
]


@pytest.mark.parametrize("edit,line,text", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_recipe_one_line_with_file_line_and_key(tmp_path, dataset, edit, line, text):
    source = GOOD.replace(*edit)
    assert source != GOOD
    path = write(tmp_path, source, dataset)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert len(error.value.problems) == 1, error.value.problems
    assert error.value.problems[0].startswith(f"{path}:{line}: ")
    assert text in error.value.problems[0]


@pytest.mark.parametrize("source,text", [
    ("stages: []\n", "stages: List should have at least 1 item"),
    ("- a\n- b\n", "a recipe is a YAML mapping"),
    ("name: x\nmodel: {name: vgg7\n", "not a valid recipe YAML"),
    ("name: !!python/object/apply:os.system ['true']\n",
     "YAML tag !!python/object/apply:os.system is not allowed"),
])
def test_unparseable_or_unsafe_yaml(tmp_path, source, text):
    path = tmp_path / "r.yaml"
    path.write_text(source)
    with pytest.raises(RecipeError) as error:
        load_recipe(path, schema_only=True)
    assert any(text in p for p in error.value.problems), error.value.problems


def test_missing_paths(tmp_path, dataset):
    with pytest.raises(RecipeError, match=r":7: data.root: dataset directory .* does not exist"):
        load_recipe(write(tmp_path, GOOD))
    (dataset / "val").rename(dataset / "validation")
    with pytest.raises(RecipeError, match="has no val/ directory"):
        load_recipe(write(tmp_path, GOOD, dataset))
    (dataset / "validation").rename(dataset / "val")
    source = GOOD.replace("    init_from: previous\n    epochs: 1", "    epochs: 1") \
        .replace("    transition: decouple\n", "    init_from: ckpt/none.pt\n")
    with pytest.raises(RecipeError, match="stages.1.init_from: checkpoint ckpt/none.pt does not exist"):
        load_recipe(write(tmp_path, source, dataset))
    assert load_recipe(write(tmp_path, GOOD), schema_only=True).name == "tiny"


def test_bad_overrides(tmp_path, dataset):
    path = write(tmp_path, GOOD, dataset)
    for item, text in [("stages.7.epochs=1", "has no item '7'"), ("seed", "expected KEY.PATH=VALUE"),
                       ("stages.0.epochs=[1", "not valid YAML"), ("data.root.x=1", "not a mapping")]:
        with pytest.raises(RecipeError, match=text):
            load_recipe(path, [item])


def test_step_schedule_uses_one_based_milestones():
    schedule = ScheduleSection(kind="step", milestones=[3, 5], gamma=0.1)
    lrs = [learning_rate(schedule, 1.0, epoch * 10, 10, 6) for epoch in range(6)]
    assert lrs == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_and_warmup_are_pure_functions_of_the_step():
    cosine = ScheduleSection(kind="cosine", warmup_epochs=1)
    lrs = [learning_rate(cosine, 0.2, step, 4, 3) for step in range(12)]
    assert lrs[:4] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert lrs[4] == pytest.approx(0.2) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert learning_rate(ScheduleSection(kind="constant"), 0.3, 99, 4, 3) == 0.3


def test_validate_command(tmp_path, dataset):
    good = subprocess.run([str(BIN), "validate", str(write(tmp_path, GOOD, dataset))],
                          capture_output=True, text=True)
    assert good.returncode == 0 and "coupled (coupled, 2 ep) -> finetune (decoupled, 1 ep, via decouple)" in good.stdout
    bad = subprocess.run([str(BIN), "validate", str(write(tmp_path, GOOD, dataset)),
                          "--set", "stages.0.epochs=zero", "--set", "data.batch_size=-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 2
    assert all(line.startswith("binaryduo: error: ") for line in bad.stderr.strip().splitlines())


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml")))
def test_shipped_recipes_pass_schema_only(recipe, monkeypatch, capsys):
    """``binaryduo validate --schema-only RECIPE``, run in this process: the same handler (the
    installed command is exercised by test_validate_command), without a ~3 s interpreter start
    per recipe."""
    from binaryduo.trainer.cli.main import main

    monkeypatch.chdir(REPO)
    returncode = main(["validate", "--schema-only", recipe])
    output = capsys.readouterr()
    result = subprocess.CompletedProcess(["binaryduo", "validate", "--schema-only", recipe],
                                         returncode, output.out, output.err)
    assert result.returncode == 0, result.stderr


def test_a_key_added_later_changes_no_recipe_identity_while_at_its_default(tmp_path):
    """Runs started before ``decouple_flip_tolerance``, ``compile`` or ``data.image_size`` existed
    resume (same recipe hash) as long as the recipe leaves them at their default; set to anything
    else, they are part of the recipe."""
    from binaryduo.trainer.recipe import load_recipe
    from binaryduo.trainer.tracking.provenance import recipe_hash

    path = REPO / "recipes" / "demo" / "fashion_mnist_vgg7_binaryduo.yaml"
    plain = load_recipe(path, [])
    assert all("decouple_flip_tolerance" not in stage for stage in plain.identity()["stages"])
    assert all("decouple_flip_tolerance" in stage
               for stage in plain.model_dump(mode="json")["stages"])  # still in the saved recipe
    changed = load_recipe(path, ["stages.finetune.decouple_flip_tolerance=0.01"])
    assert changed.identity()["stages"][1]["decouple_flip_tolerance"] == 0.01
    assert recipe_hash(changed.identity()) != recipe_hash(plain.identity())
    # ``compile`` (top level) likewise: absent from the identity while false
    assert "compile" not in plain.identity() and plain.model_dump()["compile"] is False
    compiled = load_recipe(path, ["compile=true"])
    assert compiled.compile is True and compiled.identity()["compile"] is True
    assert recipe_hash(compiled.identity()) != recipe_hash(plain.identity())
    assert load_recipe(path, ["compile=false"]).identity() == plain.identity()
    # ``data.image_size`` likewise: absent while None (the preset's size)
    assert "image_size" not in plain.identity()["data"]
    assert plain.model_dump()["data"]["image_size"] is None
    sized = load_recipe(path, ["data.image_size=48", "model.name=resnet18",
                               "model.options.input_size=48"])
    assert sized.identity()["data"]["image_size"] == 48
    assert recipe_hash(sized.identity()) != recipe_hash(plain.identity())


def test_the_legacy_run_recipe_keeps_its_hash():
    """The recipe of the run that commit ca633a7 wrote (tests/fixtures/legacy_run_ca633a7) hashes
    to the ``recipe_hash`` in its run_state.json with today's schema: every key added since is
    left out at its default (LATER_KEYS_AT_DEFAULT), so the run still resumes."""
    import json

    from binaryduo.trainer.recipe import load_recipe
    from binaryduo.trainer.tracking.provenance import recipe_hash

    legacy = REPO / "tests" / "fixtures" / "legacy_run_ca633a7"
    recipe = load_recipe(legacy / "tiny.yaml", [], schema_only=True)
    state = json.loads((legacy / "run" / "run_state.json").read_text())
    assert recipe_hash(recipe.identity()) == state["recipe_hash"]
