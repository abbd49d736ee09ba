"""The `dydiff-env` command line: complete help, a fast `--help` that does not import torch, one --threads flag,
and `collect` refusing an existing dataset id before it collects anything."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dydiff_env import cli

from conftest import TINY_DATASET_ID

PACKAGE_ROOT = str(Path(cli.__file__).resolve().parents[1])
COMPUTING_COMMANDS = (("collect",), ("generate",), ("train",), ("behaviour", "train"), ("behaviour", "eval"))


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: p for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, p in action.choices.items()}


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of the parser and every subcommand below it."""
    yield path, parser
    for name, child in subparsers(parser).items():
        yield from walk(child, (*path, name))


def command(*path: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for name in path:
        parser = subparsers(parser)[name]
    return parser


def test_every_option_and_subcommand_has_help():
    missing = []
    for path, parser in walk(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                described = {a.dest for a in action._choices_actions if a.help}
                missing += [f"{' '.join((*path, name))} (subcommand)" for name in action.choices if name not in described]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path) or 'dydiff-env'} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help text: {missing}"
    assert len(list(walk(cli.build_parser()))) == 9  # the walk reaches every command


def test_every_computing_command_has_the_same_threads_flag():
    for path in COMPUTING_COMMANDS:
        threads = next(a for a in command(*path)._actions if a.dest == "threads")
        assert (threads.option_strings, threads.default, threads.help) == (["--threads"], 1, cli.THREADS_HELP), path
    assert command("train").parse_args(["all", "--out", "x", "--threads", "2"]).threads == 2


def test_help_is_fast_and_imports_no_torch():
    """`dydiff-env --help` answers at once: the package and the CLI import neither torch nor minari."""
    probe = ("import sys, time; start = time.perf_counter(); import dydiff_env.cli as cli; cli.build_parser(); "
             "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'minari', 'mujoco', 'matplotlib'}); "
             "print(heavy, round(time.perf_counter() - start, 3))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    assert out.startswith("[]"), f"importing the CLI imports {out}"
    start = time.perf_counter()
    shown = subprocess.run([sys.executable, "-m", "dydiff_env.cli", "--help"], capture_output=True, text=True, env=env,
                           check=True)
    seconds = time.perf_counter() - start
    assert "collect" in shown.stdout and "behaviour" in shown.stdout
    assert seconds < 3.0, f"dydiff-env --help took {seconds:.1f} s"  # about 0.5 s; generous for a loaded machine


def test_collect_refuses_an_existing_id_before_collecting(tiny_dataset, monkeypatch, capsys):
    from dydiff_env import data

    def collect_episodes(*args, **kwargs):
        raise AssertionError("collect ran before checking the dataset id")

    monkeypatch.setattr(data, "collect_episodes", collect_episodes)
    for argv in (["collect", "hopper-random", "--dataset-id", TINY_DATASET_ID],
                 # refused before the actor file is even read
                 ["collect", "--actor", "missing-actor.safetensors", "--dataset-id", TINY_DATASET_ID]):
        start = time.perf_counter()
        assert cli.main(argv) == 1
        assert time.perf_counter() - start < 5.0
        err = capsys.readouterr().err
        assert err.startswith("error: ") and TINY_DATASET_ID in err and "--overwrite" in err
        assert len(err.strip().splitlines()) == 1


def test_collect_rejects_an_unknown_collection_before_anything_else(capsys):
    assert cli.main(["collect", "hopper-nonsense"]) == 2
    assert "unknown collection 'hopper-nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize("path", COMPUTING_COMMANDS)
def test_threads_must_be_positive(path, capsys):
    required = {("train",): ["all", "--out", "x"], ("behaviour", "train"): ["--out", "x"],
                ("generate",): ["--bundle", "b", "--policy", "bc", "--starts", "1", "--out", "x/y-v0"],
                ("behaviour", "eval"): ["actor.safetensors"]}.get(path, [])
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*path, *required, "--threads", "0"])
    assert exit_info.value.code == 2 and "--threads" in capsys.readouterr().err
