"""The README's commands are real: every `phivision` invocation parses, every `--set` key exists.

Commands are taken from the README's fenced code blocks: `phivision SUB ...` (also as a path such
as `.venv/bin/phivision` or `$(which phivision)`), `python -m phivision.cli.main SUB ...` and the
same behind `torchrun ... -m phivision.cli.main SUB ...`. Each is parsed by that subcommand's own
argparse parser, `--set key=value` keys are checked against `TrainConfig`, and every shipped recipe
a train command names is loaded with its overrides (`load_config` only validates).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path

import pytest
from helpers import README, code_blocks, readme_text

from phivision.cli.main import COMMANDS, build_parser
from phivision.recipes import recipe_names, recipe_path
from phivision.train.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"}
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
TRAIN_FIELDS = {field.name for field in dataclasses.fields(TrainConfig)}


@dataclasses.dataclass
class Invocation:
    line: int  # README line where the command starts
    text: str
    subcommand: str
    args: list[str]


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join `\\` continuations; keep the number of each command's first line."""
    joined, buffer, first = [], "", None
    for number, line in lines:
        if first is None:
            first = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        joined.append((first, buffer + stripped))
        buffer, first = "", None
    if buffer:
        joined.append((first, buffer))
    return joined


def words(command: str) -> list[str]:
    command = command.replace("$(which phivision)", "phivision")
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def segments(tokens: list[str]) -> list[list[str]]:
    """Split a command line at shell operators into simple commands."""
    parts, current = [], []
    for token in tokens:
        if token in SHELL_OPERATORS:
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    return [part for part in parts if part]


def is_phivision(token: str) -> bool:
    return token == "phivision" or token.endswith("/phivision")


def invocations_in(segment: list[str]) -> tuple[str, list[str]] | None:
    """(subcommand, arguments) when this simple command runs phivision, else None."""
    for index, token in enumerate(segment):
        module_form = token == "-m" and index + 1 < len(segment) and segment[index + 1] == "phivision.cli.main"
        if module_form:
            rest = segment[index + 2 :]
            break
        script_form = is_phivision(token) and (index == 0 or segment[0] == "torchrun")
        if script_form:
            rest = segment[index + 1 :]
            break
    else:
        return None
    assert rest, f"`{' '.join(segment)}` runs phivision without a subcommand"
    return rest[0], rest[1:]


def shell_commands() -> list[tuple[int, str, list[str]]]:
    """(line number, command text, words) of every command in the README's shell code blocks."""
    commands = []
    for _start, language, lines in code_blocks(readme_text()):
        if language not in SHELL_LANGUAGES:
            continue
        for number, command in logical_lines(lines):
            try:
                tokens = words(command)
            except ValueError as error:
                raise AssertionError(f"README.md line {number}: cannot split `{command}`: {error}") from None
            if tokens:
                commands.append((number, command.strip(), tokens))
    return commands


def readme_invocations() -> list[Invocation]:
    found = []
    for number, command, tokens in shell_commands():
        for segment in segments(tokens):
            invocation = invocations_in(segment)
            if invocation:
                found.append(Invocation(number, command, *invocation))
    return found


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


@pytest.fixture(scope="module")
def subcommands() -> dict[str, argparse.ArgumentParser]:
    # Only subcommands whose module exists: a README command naming a missing one must fail.
    return subparsers_of(build_parser(available_only=True))


@pytest.fixture(scope="module")
def invocations() -> list[Invocation]:
    found = readme_invocations()
    assert len(found) >= 20, f"only {len(found)} phivision commands found in README.md code blocks"
    return found


def set_overrides(args: list[str]) -> list[str]:
    values = []
    for index, arg in enumerate(args):
        if arg == "--set":
            assert index + 1 < len(args), "--set without KEY=VALUE"
            values.append(args[index + 1])
        elif arg.startswith("--set="):
            values.append(arg[len("--set="):])
    return values


def test_first_commands_are_make_demo_and_make_test():
    lines = readme_text().splitlines()
    commands = [(number, " ".join(tokens)) for number, _text, tokens in shell_commands()]
    assert [command for _, command in commands[:2]] == ["make demo", "make test"], commands[:2]
    assert all(number <= 15 for number, _ in commands[:2]), commands[:2]
    assert lines[0].startswith("# phivision")
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_every_subcommand_exists(invocations, subcommands):
    missing = sorted({f"{i.subcommand} (README line {i.line})" for i in invocations if i.subcommand not in subcommands})
    assert not missing, f"README uses subcommands phivision does not have: {missing}"


def test_every_flag_is_accepted(invocations, subcommands):
    problems = []
    for invocation in invocations:
        parser = subcommands.get(invocation.subcommand)
        if parser is None:
            continue  # reported by test_every_subcommand_exists
        known = set(parser._option_string_actions)
        for arg in invocation.args:
            if arg.startswith("-") and not re.fullmatch(r"-\d.*", arg):
                flag = arg.split("=", 1)[0]
                if flag not in known:
                    problems.append(f"line {invocation.line}: phivision {invocation.subcommand} has no {flag}")
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser.parse_args(invocation.args)
        except SystemExit:
            message = stderr.getvalue().strip().splitlines()[-1:] or [""]
            problems.append(f"line {invocation.line}: `{invocation.text}` does not parse: {message[0]}")
    assert not problems, "\n".join(problems)


def test_every_set_key_is_a_config_key(invocations):
    problems = []
    for invocation in invocations:
        for override in set_overrides(invocation.args):
            key = override.split("=", 1)[0].strip()
            if "=" not in override or key not in TRAIN_FIELDS:
                problems.append(f"line {invocation.line}: --set {override}: {key!r} is not a TrainConfig key")
    assert not problems, "\n".join(problems)


def test_no_configs_folder_is_mentioned():
    """Recipes ship inside the package: an installed phivision has no configs/ folder."""
    assert not re.findall(r"configs/[\w.-]+\.yaml", readme_text())


def test_every_recipe_in_the_table_ships_and_loads():
    table = re.findall(r"^\| `(\w+)` \| ", readme_text(), re.M)
    recipes = sorted({name for name in table if name in recipe_names()})
    assert recipes == recipe_names(), f"README.md's tables list {table}"
    for name in recipes:
        load_config(recipe_path(name))


def test_train_commands_load_with_their_overrides(invocations, subcommands):
    trained = [i for i in invocations if i.subcommand == "train" and "train" in subcommands]
    assert trained, "README.md shows no train command"
    recipes = [invocation for invocation in trained
               if subcommands["train"].parse_args(invocation.args).config in recipe_names()]
    assert len(recipes) >= 10, "README.md trains few shipped recipes by name"
    for invocation in recipes:
        args = subcommands["train"].parse_args(invocation.args)
        load_config(recipe_path(args.config), args.overrides)


def test_every_subcommand_is_documented(invocations, subcommands):
    used = {invocation.subcommand for invocation in invocations}
    undocumented = sorted(set(subcommands) - used)
    assert not undocumented, f"README.md shows no command for: {undocumented}"
    assert set(subcommands) <= set(COMMANDS)


def test_data_format_examples_are_valid_samples():
    """Every line of the README's json blocks is a sample the format rules and tag numbering accept."""
    from phivision.data.format import parse_sample
    from phivision.processing.prompt import user_content

    checked = 0
    for _start, language, lines in code_blocks(readme_text()):
        if language != "json":
            continue
        for number, line in lines:
            if not line.strip():
                continue
            sample = parse_sample(line, README, number)
            for index, (turn, first) in enumerate(zip(sample.turns, sample.first_image_numbers())):
                user_content(sample.id, index, turn.user, first, turn.num_images())
            checked += 1
    assert checked >= 3, "README.md shows no data format examples"
