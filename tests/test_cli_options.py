"""The options several commands share are defined once, in cli/options.py."""

from __future__ import annotations

import re
from pathlib import Path

import click

from dalikd.cli.main import cli

CLI = Path(__file__).resolve().parents[1] / "cli"
SHARED = ("--device", "--mixing", "--aug-granularity", "--granularity")


def test_shared_options_are_declared_only_in_options_py():
    # main.py's TRAIN_OPTIONS table (config keys, default None) is the train command's own
    copies = {
        f"{path.name}: {flag}"
        for path in CLI.glob("*.py")
        if path.name != "options.py"
        for flag in SHARED
        if re.search(rf'click\.option\(\s*"{flag}"', path.read_text())
    }
    assert not copies, sorted(copies)


def _param(command: str, name: str) -> click.Option:
    return next(p for p in cli.commands[command].params if p.name == name)


def test_the_commands_get_the_shared_options():
    for command in ("preview", "profile", "tstddev", "eval", "demo"):
        device = _param(command, "device")
        assert list(device.type.choices) == ["auto", "cpu", "gpu"], command
        assert device.default == "auto"
    for command in ("profile", "tstddev"):
        mixing = _param(command, "mixing")
        assert list(mixing.type.choices) == ["auto", "native", "composed"]
        assert mixing.default == "auto"
    assert _param("preview", "granularity").opts == ["--granularity", "--aug-granularity"]
    assert _param("tstddev", "granularity").opts == ["--aug-granularity"]
    assert list(_param("tstddev", "granularity").type.choices) == ["sample", "batch"]
