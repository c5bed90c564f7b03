"""`shadowserve --help` and each command's help: every subcommand described in one line;
positionals and the options needed first before the tuning knobs and pass-through."""

import pytest

from server.cli import Shadowserve, main


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_every_subcommand_has_a_one_line_description(capsys):
    text = help_of(capsys)
    commands = [name.replace("_", "-") for name in Shadowserve.model_fields]
    assert len(commands) == 10
    lines = text.splitlines()
    for command in commands:
        row = next(line for line in lines if line.strip().split(" ")[0] == command)
        assert len(row.strip()) > len(command) + 10, f"{command} has no description in --help"


def test_verify_help_puts_what_a_user_needs_first(capsys):
    text = help_of(capsys, "verify")
    assert text.startswith("usage: shadowserve verify [options] CANDIDATE REFERENCE\n")
    order = [text.index(s) for s in ("\n  CANDIDATE  ", "\n  --prompts", "\n  --json", "\n  --strict", "\nverdict tuning:",
                                     "\n  --verdict-kl-ratio-max", "\nvLLM pass-through:", "\n  --tensor-parallel-size")]
    assert order == sorted(order)


def test_serve_help_groups_the_shadow_the_verdict_and_vllm(capsys):
    text = help_of(capsys, "serve")
    sections = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert sections == ["options:", "shadow path:", "verdict tuning:", "engine and memory:", "limits and lifecycle:",
                        "mounted LoRA adapters (vLLM):", "vLLM pass-through:"]
    options = text.split("shadow path:")[0]
    for first in ("--model", "--host", "--port", "--dtype", "--shadow-rate", "--shadow-reference-url"):
        assert first in options
    assert "--verdict-confidence" not in options and "--tensor-parallel-size" not in options


def test_other_commands_keep_their_plain_layout(capsys):
    text = help_of(capsys, "plan")
    assert "vLLM pass-through" not in text and "--tensor-parallel-size" in text


@pytest.mark.parametrize("command", [name.replace("_", "-") for name in Shadowserve.model_fields])
def test_each_flag_states_one_default(capsys, command):
    """pydantic-settings appends its own default to every flag's help: a list flag read
    "(default factory: list)", and a description that says its default got a second one."""
    text = " ".join(help_of(capsys, command).split())
    flags = [chunk for chunk in text.split(" --")[1:]]
    assert flags
    for flag in flags:
        assert "default factory" not in flag, flag
        assert flag.count("(default:") <= 1, flag


def test_one_default_keeps_the_description_s_own():
    from server.cli_help import one_default

    assert one_default("name clients send (default: the directory's name) (default: null)") == \
        "name clients send (default: the directory's name)"
    assert one_default("accepted keys (default factory: list)") == "accepted keys (default: none)"
    assert one_default("share of requests (default: 0.0)") == "share of requests (default: 0.0)"
