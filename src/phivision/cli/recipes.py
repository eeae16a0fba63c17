"""`phivision recipes [NAME]`: the shipped training recipes, or one recipe's YAML to copy and edit."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None,
                        help="print this recipe's YAML (e.g. `phivision recipes docvqa > my.yaml` to start your own)")


def run(args: argparse.Namespace) -> int:
    from phivision.recipes import recipe_path, recipes

    if args.name is not None:
        print(recipe_path(args.name).read_text(), end="")
        return 0
    found = recipes()
    name_width = max(len(recipe.name) for recipe in found)
    data_width = max(len(recipe.train_data) for recipe in found)
    for recipe in found:
        print(f"{recipe.name:<{name_width}}  {recipe.train_data:<{data_width}}  {recipe.summary}")
    print("train one with `phivision train NAME [--set key=value ...]`; "
          "`phivision recipes NAME` prints its YAML")
    return 0
