"""Bad recipes and untrusted recipe files (issue 5).

One table of malformed recipes: each is a one-place edit of the valid tiny recipe (or a raw file),
run through ``binaryduo train RECIPE --output OUT`` in a fresh working directory. Every one must
end with exit status 2, one ``binaryduo: error: <file>...`` line per problem naming the key and/or
the value, no output directory, no MLflow store, nothing else in the working directory, and no
code run (the ``!!python`` cases would create a marker file).

A failing ``binaryduo train`` process costs about 2 s on the 2-core test machine (interpreter and
imports), so the table runs in-process through ``binaryduo.trainer.cli.main`` and a handful of
cases, of different classes, also run as real processes (``run_binaryduo``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from binaryduo.trainer.cli.errors import EXIT_USAGE
from binaryduo.trainer.cli.main import main

UNSET_VAR = "BINARYDUO_TEST_SURELY_UNSET"
MLFLOW_STORES = ("mlflow.db", "mlruns", "mlartifacts")


@dataclass(frozen=True)
class Case:
    id: str
    #: (old, new): replace ``old`` (which must occur exactly once) in the valid recipe; a callable
    #: ``f(text, ctx) -> str | bytes``; or ``None`` for the valid recipe as is (the --set cases).
    edit: tuple[str, str] | Callable | None
    #: every fragment must appear in stderr (the key path, the value, the reason)
    fragments: tuple[str, ...]
    sets: tuple[str, ...] = ()
    #: problems (stderr lines) the case holds
    problems: int = 1
    #: prepares the working directory (ctx: cwd, data, marker); returns nothing
    setup: Callable | None = None
    #: also run ``binaryduo validate`` on it
    validate: bool = False


def r(old: str, new: str) -> tuple[str, str]:
    return (old, new)


def _raw(content: str | bytes) -> Callable:
    return lambda text, ctx: content


def _only_stages(stages: str) -> Callable:
    return lambda text, ctx: text.split("stages:\n")[0] + stages


def _mkdir(*parts: str) -> Callable:
    def setup(ctx):
        (ctx["cwd"].joinpath(*parts)).mkdir(parents=True)
    return setup


def _junk_dir(name: str) -> Callable:
    def setup(ctx):
        (ctx["cwd"] / name).mkdir()
        (ctx["cwd"] / name / "notes.txt").write_text("mine\n")
    return setup


ALIAS_BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))  # 10**9 values

CASES = [
    # ---------------------------------------------------------------- wrong types
    Case("seed-is-a-string", r("seed: 7", "seed: '7'"), ("tiny.yaml:2: seed:", "valid integer",
                                                          "(got '7')")),
    Case("epochs-is-a-float", r("epochs: 2", "epochs: 2.0"),
         ("stages.0.epochs:", "valid integer", "(got 2.0)")),
    Case("lr-is-a-word", r("{lr: 0.05}", "{lr: fast}"),
         ("stages.0.optimizer.lr:", "valid number", "(got 'fast')"), validate=True),
    Case("nesterov-is-a-number", r("{lr: 0.05}", "{lr: 0.05, nesterov: 1}"),
         ("stages.0.optimizer.nesterov:", "valid boolean", "(got 1)")),
    Case("optimizer-is-a-string", r("optimizer: {lr: 0.05}", "optimizer: sgd"),
         ("stages.0.optimizer: should be a mapping", "(got 'sgd')")),
    Case("model-is-a-string", r("model:\n  name: vgg7\n  options: {width_mult: 0.25, "
                                "num_classes: 10, in_channels: 1}", "model: vgg7"),
         ("tiny.yaml:3: model: should be a mapping", "(got 'vgg7')")),
    Case("stages-is-a-mapping", _only_stages("stages:\n  coupled: {variant: coupled}\n"),
         ("stages: Input should be a valid list",)),
    Case("stage-is-null", _only_stages("stages:\n  - null\n"),
         ("stages.0: should be a mapping", "(got None)")),
    Case("integer-key", r("seed: 7", "seed: 7\n1: 2"), ("tiny.yaml:3: 1: Keys should be strings",)),
    # ---------------------------------------------------------------- unknown keys
    Case("unknown-top-level-key", r("seed: 7", "seed: 7\nseeds: 8"),
         ("tiny.yaml:3: seeds: unknown key",), validate=True),
    Case("unknown-optimizer-key", r("{lr: 0.05}", "{lr: 0.05, lr_decay: 0.1}"),
         ("stages.0.optimizer.lr_decay: unknown key",)),
    Case("misspelt-schedule-key", r("milestones: [2]", "milestone: [2]"),
         ("stages.0.schedule.milestone: unknown key",)),
    Case("missing-required-key", r("  preset: small\n", ""),
         ("data.preset: required key is missing",)),
    # ---------------------------------------------------------------- values out of range
    Case("negative-epochs", r("epochs: 2", "epochs: -2"),
         ("tiny.yaml:17: stages.0.epochs:", "greater than 0", "(got -2)"), validate=True),
    Case("zero-epochs", r("epochs: 1", "epochs: 0"), ("stages.1.epochs:", "(got 0)")),
    Case("zero-lr", r("{lr: 0.05}", "{lr: 0.0}"),
         ("stages.0.optimizer.lr:", "greater than 0", "(got 0.0)")),
    Case("infinite-lr", r("{lr: 0.05}", "{lr: .inf}"),
         ("stages.0.optimizer.lr:", "finite number", "(got inf)")),
    Case("nan-lr", r("{lr: 0.01}", "{lr: .nan}"), ("stages.1.optimizer.lr:", "(got nan)")),
    Case("momentum-one", r("{lr: 0.05}", "{lr: 0.05, momentum: 1.0}"),
         ("stages.0.optimizer.momentum:", "less than 1", "(got 1.0)")),
    Case("batch-size-zero", r("batch_size: 64", "batch_size: 0"),
         ("tiny.yaml:10: data.batch_size:", "greater than 0", "(got 0)")),
    Case("image-size-zero", r("  channels: 1\n", "  channels: 1\n  image_size: 0\n"),
         ("tiny.yaml:10: data.image_size:", "greater than 0", "(got 0)")),
    Case("image-size-is-a-string", None, ("data.image_size:", "valid integer", "(got '64px')"),
         sets=("data.image_size=64px",)),
    Case("image-size-not-the-models", None,
         ("data.image_size:", "the pipeline gives 48x48 images but vgg7 is built for 32x32"),
         sets=("data.image_size=48",)),
    Case("subset-below-one-batch", r("train_subset: 1024", "train_subset: 10"),
         ("data.train_subset: 10 images are fewer than data.batch_size (64)",)),
    Case("milestone-after-last-epoch", r("milestones: [2]", "milestones: [5]"),
         ("stages.0:", "milestones [5] lie after the stage's last epoch (2)")),
    Case("milestones-unsorted", lambda text, ctx: text.replace("epochs: 2", "epochs: 4")
         .replace("milestones: [2]", "milestones: [3, 2]"),
         ("stages.0.schedule:", "milestones must be increasing", "[3, 2]")),
    Case("milestones-with-cosine", r("kind: cosine", "kind: cosine, milestones: [1]"),
         ("stages.1.schedule:", "milestones only apply to kind 'step'")),
    Case("warmup-whole-stage", r("kind: cosine", "kind: cosine, warmup_epochs: 1"),
         ("stages.1:", "warmup_epochs (1) must be fewer than epochs (1)")),
    # ---------------------------------------------------------------- unknown names
    Case("unknown-model", r("name: vgg7", "name: vgg9"),
         ("tiny.yaml:4: model.name: unknown model 'vgg9'", "vgg7"), validate=True),
    Case("unknown-model-option", r("width_mult: 0.25", "width: 0.25"),
         ("model.options:", "unknown option(s) width")),
    Case("bad-model-option-value", r("width_mult: 0.25", "width_mult: -1"),
         ("model.options:", "width_mult=-1")),
    Case("unknown-preset", r("preset: small", "preset: tiny"),
         ("data.preset:", "(got 'tiny')")),
    Case("unknown-variant", r("    variant: coupled\n", "    variant: ternary\n"),
         ("stages.0.variant:", "(got 'ternary')")),
    Case("unknown-schedule-kind", r("kind: cosine", "kind: exponential"),
         ("stages.1.schedule.kind:", "(got 'exponential')")),
    Case("betas-for-sgd", r("{lr: 0.01}", "{lr: 0.01, betas: [0.5, 0.9]}"),
         ("stages.1.optimizer:", "betas apply to adam/adamw only")),
    Case("unknown-parameter-role", r("{lr: 0.01}", "{lr: 0.01, groups: {binary: {}}}"),
         ("stages.1.optimizer.groups.binary",)),
    Case("unknown-optimizer", r("{lr: 0.01}", "{lr: 0.01, name: lamb}"),
         ("stages.1.optimizer.name:", "(got 'lamb')")),
    Case("unknown-precision", r("seed: 7", "seed: 7\nprecision: fp16"),
         ("precision:", "(got 'fp16')")),
    Case("channels-mismatch", r("in_channels: 1", "in_channels: 3"),
         ("data.channels: the pipeline gives 1-channel images but model.options.in_channels is 3",)),
    # ---------------------------------------------------------------- the stage chain
    Case("empty-stage-list", _only_stages("stages: []\n"),
         ("stages: List should have at least 1 item",), validate=True),
    Case("no-stages-key", _only_stages(""), ("stages: required key is missing",)),
    Case("decouple-from-bnn", r("    variant: coupled\n", "    variant: bnn\n"),
         ("stages.1.transition: decouple needs a coupled previous stage", "'bnn'")),
    Case("decouple-first-stage", _only_stages(
        "stages:\n  - {name: only, variant: decoupled, transition: decouple, init_from: previous,"
        " epochs: 1, optimizer: {lr: 0.1}}\n"),
        ("stages.0.init_from: the first stage has no previous stage",
         "stages.0.transition: decouple needs init_from: previous"), problems=2),
    Case("decouple-without-init-from", r("    init_from: previous\n", ""),
         ("stages.1.transition: decouple needs init_from: previous",)),
    Case("variant-change-without-decouple", r("    transition: decouple\n", ""),
         ("stages.1.init_from: stage 'coupled' trains 'coupled', this one 'decoupled'",)),
    Case("duplicate-stage-names", r("  - name: finetune", "  - name: coupled"),
         ("tiny.yaml:20: stages.1.name: duplicate stage name 'coupled'",)),
    Case("numeric-stage-name", r("  - name: finetune", "  - name: '1'"),
         ("stages.1.name: must not be a number", "(got '1')")),
    # ---------------------------------------------------------------- paths and the environment
    Case("missing-data-dir", lambda text, ctx: text.replace(str(ctx["data"]), "/nonexistent/fm"),
         ("tiny.yaml:7: data.root: dataset directory /nonexistent/fm does not exist",),
         validate=True),
    Case("data-dir-not-a-dataset", lambda text, ctx: text.replace(str(ctx["data"]), "junk"),
         ("data.root: dataset junk:", "not a dataset directory"), setup=_junk_dir("junk")),
    Case("prepare-over-other-files",
         lambda text, ctx: text.replace(str(ctx["data"]), "mine")
         .replace("  preset: small", "  preset: small\n  prepare: fashion-mnist"),
         ("data.root: mine exists and is not a fashion-mnist dataset",), setup=_junk_dir("mine")),
    Case("unset-variable", lambda text, ctx: text.replace(str(ctx["data"]), f"${{{UNSET_VAR}}}"),
         (f"data.root: environment variable {UNSET_VAR} is not set",)),
    Case("init-from-missing-checkpoint",
         r("    variant: coupled\n", "    variant: coupled\n    init_from: old/model_state.pt\n"),
         ("stages.0.init_from: checkpoint old/model_state.pt does not exist",)),
    Case("init-from-a-directory",
         r("    variant: coupled\n", "    variant: coupled\n    init_from: old\n"),
         ("stages.0.init_from: checkpoint old is not a file",), setup=_mkdir("old")),
    Case("recipe-file-missing", lambda text, ctx: None,
         ("nope.yaml: cannot read recipe (No such file or directory)",)),
    # ---------------------------------------------------------------- not a YAML recipe
    Case("empty-file", _raw(""), ("tiny.yaml: the recipe is empty",), validate=True),
    Case("only-comments", _raw("# name: tiny\n\n"), ("tiny.yaml: the recipe is empty",)),
    Case("top-level-list", _raw("- name: tiny\n- seed: 1\n"),
         ("tiny.yaml: a recipe is a YAML mapping", "got a list")),
    Case("top-level-scalar", _raw("tiny-duo\n"), ("a recipe is a YAML mapping", "got a str")),
    Case("tab-indentation", r("  preset: small", "\tpreset: small"),
         ("tiny.yaml:8: not a valid recipe YAML:", "'\\t'")),
    Case("unclosed-bracket", r("{lr: 0.05}", "{lr: 0.05"),
         ("tiny.yaml:", "not a valid recipe YAML")),
    Case("bad-indentation", r("  batch_size: 64", "    batch_size: 64"),
         ("tiny.yaml:10: not a valid recipe YAML",)),
    Case("duplicate-key", r("seed: 7", "seed: 7\nseed: 8"),
         ("tiny.yaml:3: seed: duplicate key (first given on line 2",)),
    Case("duplicate-nested-key", r("{lr: 0.05}", "{lr: 0.05, lr: 5.0}"),
         ("tiny.yaml:18: stages.0.optimizer.lr: duplicate key",)),
    Case("not-utf8", _raw(b"name: caf\xe9\n"), ("tiny.yaml: not a UTF-8 text file",)),
    Case("binary-file", _raw(b"\x00\x01\x02\x03"), ("tiny.yaml: not a valid recipe YAML",)),
    Case("alias-bomb", _raw(ALIAS_BOMB), ("more than 10000 values", "alias")),
    Case("deeply-nested", r("seed: 7", "seed: " + "[" * 3000 + "]" * 3000),
         ("tiny.yaml: nested too deeply to be a recipe",)),
    Case("self-referencing-alias", r("seed: 7", "seed: 7\nloop: &x [*x]"),
         ("loop.0: a YAML alias refers to a value that contains it",)),
    Case("yaml-merge-of-unknown-key", r("seed: 7", "seed: 7\n<<: {sede: 1}"),
         ("sede: unknown key",)),
    # ---------------------------------------------------------------- untrusted files: no code
    Case("python-object-apply", lambda text, ctx: text.replace(
        "name: tiny-duo", f"name: !!python/object/apply:os.system ['touch {ctx['marker']}']"),
        ("tiny.yaml:1: YAML tag !!python/object/apply:os.system is not allowed",), validate=True),
    Case("python-name", r("name: tiny-duo", "name: !!python/name:os.system"),
         ("YAML tag !!python/name:os.system is not allowed",)),
    Case("python-object-new", lambda text, ctx: text.replace(
        "seed: 7", f"seed: !!python/object/apply:builtins.open ['{ctx['marker']}', 'w']"),
        ("tiny.yaml:2: YAML tag !!python/object/apply:builtins.open is not allowed",)),
    Case("python-module", r("seed: 7", "seed: !!python/module:os"),
         ("YAML tag !!python/module:os is not allowed",)),
    Case("local-tag", r("seed: 7", "seed: !include other.yaml"),
         ("YAML tag !include is not allowed",)),
    # ---------------------------------------------------------------- untrusted files: no escape
    Case("recipe-name-escapes", r("name: tiny-duo", "name: ../../escape"),
         ("tiny.yaml:1: name: must be a plain name", "(got '../../escape')"), validate=True),
    Case("recipe-name-absolute", r("name: tiny-duo", "name: /tmp/abs"),
         ("name: must be a plain name", "(got '/tmp/abs')")),
    Case("recipe-name-with-slash", r("name: tiny-duo", "name: runs/x"),
         ("name: must be a plain name", "(got 'runs/x')")),
    Case("recipe-name-dotdot", r("name: tiny-duo", "name: '..'"),
         ("name: must be a plain name", "(got '..')")),
    Case("recipe-name-hidden", r("name: tiny-duo", "name: .hidden"),
         ("name: must be a plain name", "(got '.hidden')")),
    Case("recipe-name-shell", r("name: tiny-duo", "name: 'x; rm -rf ~'"),
         ("name: must be a plain name", "(got 'x; rm -rf ~')")),
    Case("recipe-name-newline", r("name: tiny-duo", 'name: "a\\nb"'),
         ("name: must be a plain name", "(got 'a\\nb')")),
    Case("recipe-name-too-long", r("name: tiny-duo", "name: " + "a" * 300),
         ("name: is 300 characters long; at most 100",)),
    Case("stage-name-escapes", r("  - name: coupled", "  - name: ../x"),
         ("tiny.yaml:15: stages.0.name: must be a plain name", "(got '../x')")),
    Case("stage-name-absolute", r("  - name: finetune", "  - name: /etc"),
         ("stages.1.name: must be a plain name", "(got '/etc')")),
    Case("stage-name-with-slash", r("  - name: finetune", "  - name: fine/tune"),
         ("stages.1.name: must be a plain name", "(got 'fine/tune')")),
    Case("stage-name-with-dot", r("  - name: finetune", "  - name: fine.tune"),
         ("stages.1.name: must be a plain name", "(got 'fine.tune')")),
    Case("experiment-escapes", r("logging: {every_steps: 4}",
                                 "logging: {every_steps: 4, experiment: ../../x}"),
         ("tiny.yaml:13: logging.experiment: must be a plain name", "(got '../../x')")),
    Case("experiment-absolute", r("logging: {every_steps: 4}",
                                  "logging: {every_steps: 4, experiment: /tmp/exp}"),
         ("logging.experiment: must be a plain name", "(got '/tmp/exp')")),
    Case("tracking-uri-local-file", r("logging: {every_steps: 4}",
                                      "logging: {every_steps: 4, tracking_uri: "
                                      "'sqlite:////tmp/elsewhere.db'}"),
         ("logging.tracking_uri: a recipe may only name an MLflow tracking server",
          "sqlite:////tmp/elsewhere.db")),
    Case("tracking-uri-file-store", r("logging: {every_steps: 4}",
                                      "logging: {every_steps: 4, tracking_uri: 'file:///tmp/m'}"),
         ("logging.tracking_uri: a recipe may only name an MLflow tracking server",)),
    # ---------------------------------------------------------------- --set overrides
    Case("set-unknown-key", None, ("tiny.yaml (--set optimiser=sgd): optimiser: unknown key",),
         sets=("optimiser=sgd",), validate=True),
    Case("set-wrong-type", None,
         ("tiny.yaml (--set stages.coupled.epochs=two): stages.0.epochs:", "(got 'two')"),
         sets=("stages.coupled.epochs=two",)),
    Case("set-unknown-stage", None, ("--set 'stages.warmup.epochs=1'", "no item 'warmup'"),
         sets=("stages.warmup.epochs=1",)),
    Case("set-without-value", None, ("--set 'seed': expected KEY.PATH=VALUE",), sets=("seed",)),
    Case("set-bad-yaml", None, ("--set 'seed=[1': value is not valid YAML",), sets=("seed=[1",)),
    Case("set-into-a-scalar", None, ("--set 'data.root.x=1': data.root is not a mapping",),
         sets=("data.root.x=1",)),
    Case("set-escaping-name", None, ("(--set name=../up): name: must be a plain name",),
         sets=("name=../up",)),
    Case("set-two-problems", None,
         ("stages.0.epochs:", "(got 'zero')", "data.batch_size:", "(got -1)"),
         sets=("stages.0.epochs=zero", "data.batch_size=-1"), problems=2),
]
CASE_IDS = [case.id for case in CASES]
assert len(CASES) >= 30 and len(set(CASE_IDS)) == len(CASE_IDS)


@pytest.fixture
def valid_text(fashion_mnist, tiny_recipe_text) -> str:
    return tiny_recipe_text.replace("DATA", str(fashion_mnist))


def materialize(case: Case, tmp_path: Path, valid_text: str, fashion_mnist: Path) -> dict:
    """Writes the case's recipe (outside the working directory) and prepares the working
    directory; returns the context (paths, the listing to compare against afterwards)."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    ctx = {"cwd": cwd, "data": fashion_mnist, "marker": tmp_path / "PWNED",
           "recipe": tmp_path / "recipes" / "tiny.yaml", "out": cwd / "out"}
    ctx["recipe"].parent.mkdir()
    if case.setup is not None:
        case.setup(ctx)
    if case.edit is None:
        content = valid_text
    elif isinstance(case.edit, tuple):
        old, new = case.edit
        assert valid_text.count(old) == 1, f"{case.id}: {old!r} must occur once in the recipe"
        content = valid_text.replace(old, new)
    else:
        content = case.edit(valid_text, ctx)
    if content is None:
        ctx["recipe"] = ctx["recipe"].with_name("nope.yaml")
    elif isinstance(content, bytes):
        ctx["recipe"].write_bytes(content)
    else:
        assert content != valid_text or case.sets, f"{case.id}: the edit changed nothing"
        ctx["recipe"].write_text(content)
    ctx["before"] = snapshot(cwd)
    return ctx


def snapshot(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def check_refused(case: Case, ctx: dict, code: int, stdout: str, stderr: str) -> None:
    assert code == EXIT_USAGE, f"{case.id}: exit {code}\n{stdout}\n{stderr}"
    lines = stderr.splitlines()
    assert len(lines) == case.problems, f"{case.id}: one line per problem expected:\n{stderr}"
    for line in lines:
        assert line.startswith(f"binaryduo: error: {ctx['recipe']}"), line
    for fragment in case.fragments:
        assert fragment in stderr, f"{case.id}: {fragment!r} not in:\n{stderr}"
    assert stdout == "", stdout
    cwd = ctx["cwd"]
    assert not ctx["out"].exists()
    assert not any((cwd / store).exists() for store in MLFLOW_STORES)
    assert snapshot(cwd) == ctx["before"], "the refused run wrote into the working directory"
    assert not ctx["marker"].exists(), "a YAML tag ran code"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bad_recipe_is_refused_in_one_line_and_writes_nothing(case, tmp_path, valid_text,
                                                             fashion_mnist, monkeypatch, capsys):
    monkeypatch.delenv(UNSET_VAR, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ctx = materialize(case, tmp_path, valid_text, fashion_mnist)
    monkeypatch.chdir(ctx["cwd"])
    sets = [arg for item in case.sets for arg in ("--set", item)]
    commands = [["train", str(ctx["recipe"]), "--output", str(ctx["out"]), *sets]]
    if case.validate:
        commands.append(["validate", str(ctx["recipe"]), *sets])
    for argv in commands:
        code = main(argv)
        captured = capsys.readouterr()
        check_refused(case, ctx, code, captured.out, captured.err)


# Real processes for a mix of classes: code in a tag, a path escape, a --set typo, a missing
# directory, YAML syntax, an impossible stage chain; the last one without --output (the default
# run directory runs/<name>-<time> must not appear either).
PROCESS_CASES = ["python-object-apply", "recipe-name-escapes", "set-unknown-key",
                 "missing-data-dir", "tab-indentation", "decouple-from-bnn", "negative-epochs"]


@pytest.mark.parametrize("case_id", PROCESS_CASES)
def test_bad_recipe_in_a_real_process(case_id, tmp_path, valid_text, fashion_mnist,
                                      run_binaryduo):
    case = CASES[CASE_IDS.index(case_id)]
    ctx = materialize(case, tmp_path, valid_text, fashion_mnist)
    sets = [arg for item in case.sets for arg in ("--set", item)]
    output = [] if case_id == "negative-epochs" else ["--output", ctx["out"]]
    result = run_binaryduo("train", ctx["recipe"], *output, *sets, cwd=ctx["cwd"], timeout=120,
                           check=False)
    check_refused(case, ctx, result.returncode, result.stdout, result.stderr)
    assert not (ctx["cwd"] / "runs").exists()


def test_valid_recipe_still_validates(tmp_path, valid_text, fashion_mnist, monkeypatch, capsys):
    """The table's base recipe is valid: every case fails because of its one edit."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(valid_text)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err
    assert main(["validate", str(recipe), "--set",
                 "logging.tracking_uri=http://127.0.0.1:5000", "--set",
                 "logging.experiment=BinaryDuo_v1.2", "--set", "name=a.b-c_d"]) == 0
