"""`--help` everywhere says what each option does and what it defaults to (train's --batch-size,
--epochs and --optim, predict's --batch-size, ... said neither)."""

from __future__ import annotations

import argparse

import pytest

from branchy_tee.cli import build_parser
from branchy_tee.core.commandline import DefaultsHelpFormatter


def _commands(parser: argparse.ArgumentParser, path=()):
    yield " ".join(path) or "branchy-tee", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(build_parser()))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(name):
    parser = COMMANDS[name]
    assert issubclass(parser.formatter_class, DefaultsHelpFormatter), name
    formatter = parser.formatter_class(name)
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help"
        shown = formatter._get_help_string(action)
        if action.default not in (None, False, [], argparse.SUPPRESS):
            assert "default" in shown, f"{name} {action.option_strings[0]} does not show its default"
    parser.format_help()  # (every help string formats: no stray '%')
