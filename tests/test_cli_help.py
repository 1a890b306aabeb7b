"""Every option of every `safety-checker` subcommand says what it does and, where it has one, its default.

The parsers are walked as argparse builds them, with every installed plugin
(scan, serve, concepts, gateway) loaded through the entry-point group, so a
subcommand added later is covered without a change here.
"""

from __future__ import annotations

import argparse
from typing import Iterator, List, Tuple

import pytest

from safety_checker_client import cli

# argparse's own actions, which need no help of ours.
_ARGPARSE_ACTIONS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _parsers(
    parser: argparse.ArgumentParser, path: Tuple[str, ...] = ()
) -> Iterator[Tuple[str, argparse.ArgumentParser]]:
    yield " ".join(("safety-checker",) + path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, path + (name,))


def _options() -> List[Tuple[str, argparse.Action]]:
    return [
        (f"{command} {'/'.join(action.option_strings)}", action)
        for command, parser in _parsers(cli._parser())
        for action in parser._actions
        if action.option_strings and not isinstance(action, _ARGPARSE_ACTIONS)
    ]


OPTIONS = _options()


def test_every_plugin_subcommand_is_walked():
    commands = {command.split()[1] for command, _ in _parsers(cli._parser()) if " " in command}
    assert {"check", "scan", "serve", "concepts", "gateway"} <= commands


@pytest.mark.parametrize("name, action", OPTIONS, ids=[name for name, _ in OPTIONS])
def test_every_option_has_help_that_states_its_default(name, action):
    assert action.help and action.help is not argparse.SUPPRESS and action.help.strip(), f"{name} has no help text"
    if action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action, argparse._StoreTrueAction):
        assert "default" in action.help, f"{name} has the default {action.default!r}, which its help does not state"


def test_version_is_the_installed_client_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert version("safety-checker-client") in capsys.readouterr().out
