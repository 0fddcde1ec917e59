"""Reading a recipe: YAML with line numbers, ``--set`` overrides, ``${VAR}`` references.

``load_recipe`` reads the YAML safely, applies ``--set`` overrides, expands ``${VAR}`` /
``${VAR:-default}`` references, validates everything it can before any compute (the schema, then
:mod:`binaryduo.trainer.recipe.checks`), and raises ``RecipeError`` with one line per problem:
``file:line: key.path: message`` (``file (--set KEY=VALUE): key.path: message`` where the value
came from an override).

A recipe file is untrusted data: no YAML tag constructs an object (``!!python/...`` is refused,
nothing runs), duplicate keys, self-referencing aliases and alias bombs are refused before
anything is built, and ``${VAR}`` is expanded in the paths ``data.root``, ``stages.N.init_from`` and
``stages.N.distill.teacher.checkpoint`` only (a shared recipe cannot copy the environment into
what it logs).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from binaryduo.trainer.recipe.checks import semantic_problems
from binaryduo.trainer.recipe.schema import Recipe


class RecipeError(Exception):
    """Every problem found in a recipe; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


#: Most values a recipe may hold once YAML aliases are followed (a real recipe has about 100; an
#: alias "bomb" of nested references expands to billions and would hang the loader).
MAX_VALUES = 10_000


class _TooLarge(Exception):
    pass


def _line_map(text: str) -> tuple[dict[tuple, int], list[tuple[int, str]]]:
    """1-based line of every key path in the YAML document (mapping keys and list items), and the
    structural problems the YAML parser lets through: ``(line, message)`` for duplicate keys (the
    later one would win silently), self-referencing aliases and alias bombs."""
    lines: dict[tuple, int] = {}
    problems: list[tuple[int, str]] = []
    count = 0

    def walk(node, path, active):
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise _TooLarge
        if id(node) in active:
            problems.append((node.start_mark.line + 1, f"{_dotted(path)}: a YAML alias refers to "
                                                       f"a value that contains it (endless)"))
            return
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            active = active | {id(node)}
            first: dict[tuple, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else f"<{key.tag}>"
                child = path + (name,)
                line = key.start_mark.line + 1
                if (key.tag, name) in first and name != "<<":
                    problems.append((line, f"{_dotted(child)}: duplicate key (first given on "
                                           f"line {first[(key.tag, name)]}; YAML would "
                                           f"silently keep the last)"))
                first.setdefault((key.tag, name), line)
                lines[child] = line
                if key.tag == "tag:yaml.org,2002:int" and name.lstrip("+-").isdigit():
                    lines[path + (int(name),)] = line  # pydantic reports the key as an int
                walk(value, child, active)
        elif isinstance(node, yaml.SequenceNode):
            active = active | {id(node)}
            for index, item in enumerate(node.value):
                walk(item, path + (index,), active)

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        try:
            walk(root, (), frozenset())
        except _TooLarge:
            problems = [(1, f"(top level): the recipe holds more than {MAX_VALUES} values once "
                            f"YAML aliases are expanded (an alias bomb?)")]
    return lines, problems


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line for a YAML error; a tag that would build a Python object is named as such."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    tag = re.search(r"constructor for the tag '([^']*)'", problem)
    if tag:
        shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return (f"YAML tag {shown} is not allowed: a recipe is plain data (mappings, lists, "
                f"strings, numbers, booleans), nothing is constructed or run")
    return f"not a valid recipe YAML: {problem}"


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: expected KEY.PATH=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ValueError(f"--set {item!r}: value is not valid YAML") from None
    return key.strip().split("."), value


def apply_override(data: dict, item: str) -> tuple:
    """Sets ``a.b.c=value`` in ``data``; a stage is addressed by index or name (``stages.finetune``)."""
    keys, value = _parse_override(item)
    node: Any = data
    path: list[Any] = []
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            index = _list_index(node, key)
            if index is None:
                raise ValueError(f"--set {item!r}: {_dotted(tuple(path))} has no item {key!r}")
            path.append(index)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            path.append(key)
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ValueError(f"--set {item!r}: {_dotted(tuple(path))} is not a mapping or list")
    return tuple(path)


def _list_index(items: list, key: str) -> int | None:
    if key.isdigit():
        return int(key) if int(key) < len(items) else None
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return index
    return None


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _is_path_key(path: tuple) -> bool:
    return path == ("data", "root") or (len(path) == 3 and path[0] == "stages"
                                        and path[2] == "init_from") or (
        len(path) == 5 and path[0] == "stages" and path[2:] == ("distill", "teacher", "checkpoint"))


def _expand_env(value: Any, path: tuple, problems: list[tuple[tuple, str]], check: bool) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, path + (k,), problems, check) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path + (i,), problems, check) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    if not _is_path_key(path):
        # only paths are expanded: a shared recipe must not copy the environment (tokens,
        # secrets) into its description, tags or a tracking server's address
        if _ENV_REF.search(value):
            problems.append((path, "environment references (${...}) are only expanded in "
                                   "data.root, stages.N.init_from and "
                                   "stages.N.distill.teacher.checkpoint"))
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        if check:
            problems.append((path, f"environment variable {name} is not set (the recipe refers "
                                   f"to ${{{name}}}; export it or use --set {_dotted(path)}=PATH)"))
        return match.group(0)

    return os.path.expanduser(_ENV_REF.sub(substitute, value))


def load_recipe(path: str | Path, overrides: list[str] = (), *, schema_only: bool = False,
                base_dir: Path | None = None) -> Recipe:
    """Reads, overrides, expands and validates ``path``; raises ``RecipeError`` listing problems.

    With ``schema_only`` the environment and the file system are not consulted: variables stay
    unexpanded and paths are not checked (for validating shipped recipes anywhere).
    """
    path = Path(path)
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise RecipeError([_one_line(f"{label}: cannot read recipe "
                                     f"({error.strerror or error})")]) from None
    except UnicodeDecodeError as error:
        raise RecipeError([_one_line(f"{label}: not a UTF-8 text file (byte {error.start}: "
                                     f"{error.reason})")]) from None
    try:
        # structure first (compose builds no objects): duplicate keys and alias bombs are
        # refused before anything is constructed; safe_load then refuses every Python tag
        lines, structural = _line_map(text)
        if structural:
            raise RecipeError([_one_line(f"{label}:{line}: {message}")
                               for line, message in structural])
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RecipeError([_one_line(f"{label}{where}: {_yaml_problem(error)}")]) from None
    except RecursionError:
        raise RecipeError([f"{label}: nested too deeply to be a recipe"]) from None
    if data is None:
        raise RecipeError([f"{label}: the recipe is empty (no YAML mapping in it)"])
    if not isinstance(data, dict):
        raise RecipeError([f"{label}: a recipe is a YAML mapping of keys (name, model, data, "
                           f"stages, ...), got a {type(data).__name__}"])

    overridden: list[tuple[tuple, str]] = []  # (key path, --set item): values not from the file

    def where(key_path: tuple) -> str:
        for item_path, item in overridden:
            if key_path[:len(item_path)] == item_path:
                return f"{label} (--set {item})"
        for cut in range(len(key_path), -1, -1):
            if key_path[:cut] in lines:
                return f"{label}:{lines[key_path[:cut]]}"
        return label

    bad_overrides = []
    for item in overrides:
        try:
            overridden.append((apply_override(data, item), item))
        except ValueError as error:
            bad_overrides.append(_one_line(f"{label}: {error}"))
    if bad_overrides:
        raise RecipeError(bad_overrides)
    problems: list[tuple[tuple, str]] = []
    data = _expand_env(data, (), problems, check=not schema_only)
    recipe = None
    if not problems:
        try:
            recipe = Recipe.model_validate(data)
        except ValidationError as error:
            for detail in error.errors(include_url=False):
                loc = tuple(detail["loc"])
                problems.append((loc, _message(detail)))
    if recipe is not None:
        problems.extend(semantic_problems(recipe, check_paths=not schema_only,
                                          base_dir=base_dir or Path.cwd()))
    if problems:
        raise RecipeError([_one_line(f"{where(loc)}: {_dotted(loc)}: {msg}")
                           for loc, msg in problems])
    return recipe


def _one_line(problem: str) -> str:
    """A value quoted in a message (a path, a name) must not break the one-line-per-problem rule."""
    return problem.replace("\r", "\\r").replace("\n", "\\n")


def _message(detail: dict) -> str:
    if detail["type"] == "extra_forbidden":
        return "unknown key"
    if detail["type"] == "missing":
        return "required key is missing"
    message = detail["msg"].removeprefix("Value error, ")
    shown = detail.get("input")
    if detail["type"] in ("model_type", "dict_type"):
        message = "should be a mapping of keys"
    if not isinstance(shown, (dict, list)):
        text = repr(shown)
        message += f" (got {text if len(text) <= 80 else text[:60] + '...'})"
    return message
