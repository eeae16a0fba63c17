"""Training recipes shipped inside the package: `phivision train docvqa` works from a wheel too.

Each recipe is a YAML config whose first line is a one-line summary comment.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from phivision.errors import PhivisionError

__all__ = ["Recipe", "recipe_names", "recipe_path", "recipes", "resolve_config_path"]


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    train_data: str
    summary: str


def _folder() -> Path:
    return Path(str(resources.files("phivision") / "recipes"))


def recipe_names() -> list[str]:
    """Names of the shipped recipes, as `phivision train NAME` takes them."""
    return sorted(path.stem for path in _folder().glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The shipped YAML of a recipe name."""
    path = _folder() / f"{name}.yaml"
    if not path.is_file():
        raise PhivisionError(f"no recipe named {name!r}: choose one of {', '.join(recipe_names())}")
    return path


def _summary(text: str) -> str:
    first = text.splitlines()[0] if text else ""
    return first.lstrip("#").strip() if first.startswith("#") else ""


def recipes() -> list[Recipe]:
    """Every shipped recipe with its training data and its summary line."""
    found = []
    for name in recipe_names():
        path = recipe_path(name)
        text = path.read_text()
        found.append(Recipe(name, path, str(yaml.safe_load(text).get("train_data", "")), _summary(text)))
    return found


def resolve_config_path(config: str | Path) -> Path:
    """A YAML file as given, else the shipped recipe of that name."""
    path = Path(config)
    if path.is_file():
        return path
    if str(config) in recipe_names():
        return recipe_path(str(config))
    raise PhivisionError(f"config {config} is neither a file nor a recipe name "
                         f"({', '.join(recipe_names())}; `phivision recipes` lists them)")
