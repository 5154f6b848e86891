"""Finding recipes by name or path, reading them, `--set` overrides, and writing them back.

Shipped recipes are the YAML files of the top-level ``recipes/`` directory, packaged as
``infinitrain.recipes`` so that they are found by name in a wheel install too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .schema import Recipe
from .typed import RecipeError, UnknownFieldError, dataclass_from_plain, schema_paths, to_plain

RECIPE_PACKAGE = "infinitrain.recipes"
SUFFIX = ".yaml"


def shipped_recipes() -> dict[str, str]:
    """Name → YAML text of every recipe that comes with infinitrain."""
    folder = resources.files(RECIPE_PACKAGE)
    return {entry.name.removesuffix(SUFFIX): entry.read_text(encoding="utf-8")
            for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(SUFFIX)}


def recipe_text(name_or_path: str) -> tuple[str, str]:
    """(name, YAML text) of a shipped recipe name or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe {name_or_path}: no such file")
        try:
            return path.stem, path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise RecipeError(f"recipe {name_or_path}: not UTF-8 text (byte "
                              f"{error.object[error.start]:#04x} at offset {error.start}); save "
                              "it as UTF-8") from None
    shipped = shipped_recipes()
    if name_or_path not in shipped:
        raise RecipeError(f"recipe {name_or_path!r}: not a shipped recipe or a YAML file; shipped: "
                          f"{', '.join(shipped)}")
    return name_or_path, shipped[name_or_path]


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML would silently keep
    the last one, so a setting the user wrote would not be the one that runs)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or error
        raise RecipeError(f"recipe {source}{where}: not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {source}: expected a mapping of sections at the top level")
    return raw


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` (value parsed as YAML; list items by index) in place."""
    path, sep, text = assignment.partition("=")
    if not sep or not path:
        raise RecipeError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. optim.lr=1e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    keys = path.strip().split(".")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        where = ".".join(keys[:depth + 1])
        if isinstance(node, list):
            node = node[_index(node, key, where)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError(f"--set {path}: {where} is a value, not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[_index(node, last, path)] = value
    else:
        node[last] = value


def _index(items: list, key: str, where: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise RecipeError(f"--set {where}: no list item {key!r} (there are {len(items)})")
    return int(key)


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    try:
        return dataclass_from_plain(Recipe, raw, "")
    except UnknownFieldError as error:  # train.lr: say that optim.lr is the field
        raise error.suggesting(schema_paths(Recipe)) from None


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> tuple[str, Recipe]:
    """(name, validated recipe) with ``overrides`` applied; RecipeError says what is wrong."""
    name, text = recipe_text(name_or_path)
    raw = parse_yaml(text, name_or_path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return name, parse_recipe(raw)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults filled in) as YAML; it loads back to an equal recipe."""
    return yaml.safe_dump(to_plain(recipe), sort_keys=False, allow_unicode=True, width=100)
