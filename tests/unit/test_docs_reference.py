"""The docs' generated references are current, and every command the README and the docs
show parses against the real command line."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from pydantic_settings import SettingsError

from server.cli import cli_source

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").rglob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]


def generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_references_are_current():
    gen = generator()
    assert gen.CLI.read_text() == gen.cli_reference(), "run `.venv/bin/python docs/gen_reference.py`"
    assert gen.METRICS.read_text() == gen.metrics_reference(), "run `.venv/bin/python docs/gen_reference.py`"


def test_the_references_name_every_flag_and_every_metric():
    """Independent of the generator's own walk: every option string of every parser, and
    every family the registries describe, appears in the reference."""
    import argparse

    from prometheus_client import CollectorRegistry

    from server.metrics import HttpMetrics
    from shadow.metrics import CANDIDATE, NOISE_FLOOR, ShadowMetrics

    cli = (ROOT / "docs" / "reference" / "cli.md").read_text()
    parsers = [cli_source().root_parser]
    flags = 0
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    flags += 1
                    assert f"`{option}`" in cli, f"{option} ({parser.prog}) is missing from docs/reference/cli.md"
    assert flags > 150
    metrics = (ROOT / "docs" / "reference" / "metrics.md").read_text()
    registry = CollectorRegistry()
    ShadowMetrics(registry, "m", "r", comparisons=(CANDIDATE, NOISE_FLOOR))
    HttpMetrics(registry)
    names = [m.name for m in registry.collect()]
    assert len(names) > 20
    for name in names:
        assert re.search(rf"`{name}(_total)?`", metrics), f"{name} is missing from docs/reference/metrics.md"


def shell_blocks(text: str) -> list[str]:
    """Command lines of the ```bash / ```sh / ```shell blocks, continuations joined."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            pending = f"{pending}\n{line}" if pending else line
            try:  # a quoted argument may span lines (curl -d '{...}')
                shlex.split(pending, comments=True)
            except ValueError:
                continue
            commands.append(pending.strip())
            pending = ""
        assert not pending, f"unterminated quote in a shell block: {pending[:80]}"
    return commands


def shadowserve_args(command: str) -> list[str] | None:
    """The arguments of a `shadowserve …` command line (placeholders kept as strings)."""
    command = re.sub(r"\$\([^)]*\)", "PLACEHOLDER", command)  # $(shadowserve demo-model)
    words = shlex.split(command, comments=True)
    while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
        words.pop(0)
    if not words or Path(words[0]).name != "shadowserve":
        return None
    args = words[1:]
    for stop in ("|", ">", ">>", "2>", "&&", ";", "||", "2>&1", "&"):
        if stop in args:
            args = args[: args.index(stop)]
    # A synopsis (`[--dtype fp32|bf16|fp16]`): its options are checked as if given, the first choice each.
    return [word.strip("[]").split("|")[0] for word in args if word.strip("[]") and word != "..."]


COMMANDS = [(page.relative_to(ROOT), c) for page in PAGES for c in shell_blocks(page.read_text())]
SHADOWSERVE = [(page, c) for page, c in COMMANDS if shadowserve_args(c) is not None]


def test_the_docs_show_commands():
    assert len(SHADOWSERVE) >= 20, SHADOWSERVE


@pytest.mark.parametrize(("page", "command"), SHADOWSERVE, ids=[f"{p}:{c[:60]}" for p, c in SHADOWSERVE])
def test_every_shadowserve_command_in_the_docs_parses(page, command):
    parser = cli_source(cli_exit_on_error=False).root_parser
    args = shadowserve_args(command)
    try:
        parser.parse_args(args)
    except (SettingsError, SystemExit) as exc:
        pytest.fail(f"{page}: `{command}` does not parse: {exc}")


def test_every_make_target_in_the_docs_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    for page, command in COMMANDS:
        words = shlex.split(re.sub(r"\$\([^)]*\)", "X", command), comments=True)
        if words and words[0] == "make":
            for word in words[1:]:
                if "=" not in word and not word.startswith("-"):
                    assert word in targets, f"{page}: `{command}`: no make target {word!r}"


def test_every_script_the_docs_run_exists():
    for page, command in COMMANDS:
        for script in re.findall(r"(?:python|\.venv/bin/python)\s+((?:bench|docs|helm|tests)/[\w/.-]+\.py)", command):
            assert (ROOT / script).is_file(), f"{page}: `{command}`: {script} does not exist"
