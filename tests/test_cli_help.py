"""`vaeflow` explains itself: a version, help on every argument of every command, a
user's description with examples, `validate --config` like every other command, and a
wrong `--stage` answered with the config's stage names."""

from __future__ import annotations

import argparse
import inspect
import re

import pytest

import vaeflow
from support import REPO
from vaeflow.cli import build_parser, main


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"vaeflow {vaeflow.__version__}"


def test_every_argument_of_every_command_has_help():
    parser = build_parser()
    missing = []
    for name, sp in {"vaeflow": parser, **subcommands(parser)}.items():
        for action in sp._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            if not (action.help or "").strip():
                missing.append(f"vaeflow {'' if name == 'vaeflow' else name + ' '}{'/'.join(action.option_strings) or action.dest}")
    for action in [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]:
        for choice in action._choices_actions:
            if not (choice.help or "").strip():
                missing.append(f"vaeflow {choice.dest} (the command's one-line help)")
    assert not missing, "arguments without help text (add help=... in src/vaeflow/cli.py):\n" + "\n".join(missing)


def test_top_level_help_is_for_a_user():
    text = build_parser().format_help()
    assert "trains image autoencoders" in text and "examples:" in text
    assert "snakemake --cores 8" in text and "vaeflow validate --config" in text
    assert "entry points" not in text  # how the code is wired is not the user's business


@pytest.mark.parametrize("argv", [["validate", "config/config.yaml"], ["validate", "--config", "config/config.yaml"],
                                  ["validate"]])
def test_validate_takes_config_positionally_or_as_option(argv, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(argv) == 0
    assert "Pipeline validation passed!" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "evaluate", "sample"])
def test_wrong_stage_lists_the_config_stages(command, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = [command, "--config", "config/config.yaml", "--stage", "vae_gna"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("vaeflow: error: --stage 'vae_gna' is not a stage of config/config.yaml; "
                   "its stages: vae_warmup, vae_gan"), err


def test_dvc_yaml_refuses_results_it_would_ignore(capsys):
    with pytest.raises(SystemExit) as info:
        main(["dvc-yaml", "--config", "config/config.yaml", "--results", "elsewhere"])
    assert info.value.code == 2 and "unrecognized arguments: --results elsewhere" in capsys.readouterr().err


def _reads(func, seen=None) -> str:
    """The source of a command function and of the functions it hands `args` to (cli helpers,
    or functions it imports from other vaeflow modules)."""
    import importlib

    seen = set() if seen is None else seen
    if func in seen:
        return ""
    seen.add(func)
    try:
        src = inspect.getsource(func)
    except (OSError, TypeError):
        return ""
    imported = {}
    for module, names in re.findall(r"from (vaeflow[\w.]*) import ([\w, ]+)", src):
        for name in (n.strip() for n in names.split(",")):
            imported[name] = (module, name)
    for name in re.findall(r"\b(_?\w+)\(args\b", src):
        helper = func.__globals__.get(name)
        if helper is None and name in imported:
            helper = getattr(importlib.import_module(imported[name][0]), imported[name][1], None)
        if callable(helper) and getattr(helper, "__module__", "").startswith("vaeflow"):
            src += _reads(helper, seen)
    return src


def test_every_flag_is_read_by_its_command():
    """A flag the command never reads is accepted and ignored (as `dvc-yaml --results` was)."""
    unread = []
    for name, sp in subcommands(build_parser()).items():
        func = sp.get_default("func")
        src = _reads(func)
        for action in sp._actions:
            if action.dest in ("help", argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
                continue
            if not re.search(rf"args\.{action.dest}\b", src):
                unread.append(f"vaeflow {name} {'/'.join(action.option_strings) or action.dest}: "
                              f"args.{action.dest} is never read by {func.__name__}")
    assert not unread, "\n".join(unread)
