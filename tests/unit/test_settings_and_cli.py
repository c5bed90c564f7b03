"""Settings come from flags and SHADOWSERVE_* env; bad settings stop with a clear message."""

from __future__ import annotations

import pytest

from server.cli import main
from server.settings import ServeSettings


def test_env_and_flags(demo_model, monkeypatch):
    monkeypatch.setenv("SHADOWSERVE_MODEL", str(demo_model))
    monkeypatch.setenv("SHADOWSERVE_API_KEYS", "k1, k2")
    monkeypatch.setenv("SHADOWSERVE_ENGINE", "transformers")
    settings = ServeSettings()
    assert settings.api_keys == ["k1", "k2"]
    assert settings.engine == "transformers"
    assert settings.model_name == demo_model.name
    assert ServeSettings(served_model_name="candidate").model_name == "candidate"


def test_model_dir_must_hold_a_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        ServeSettings(model=tmp_path)


def test_cli_rejects_bad_settings_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", str(tmp_path), "--engine", "tensorrt"])
    assert exit_info.value.code == 2  # a usage error, as argparse reports one
    message = capsys.readouterr().err
    assert message.startswith("shadowserve: invalid settings:")
    assert "no config.json" in message and "engine" in message


def test_demo_model_command_prints_the_directory(demo_model, capsys):
    main(["demo-model"])
    assert capsys.readouterr().out.strip() == str(demo_model)


@pytest.mark.parametrize("args, needle", [
    (["verify", "/nowhere", "/nowhere"], "is not a Hugging Face model directory"),
    (["verify", "{demo}", "{demo}", "--prompts", "/no/such/file"], "is not a file"),
    (["verify", "{demo}", "{demo}", "--prompts", "{demo}/config.json", "--corpus", "{demo}/config.json"],
     "give --prompts or --corpus, not both"),
    (["verify", "{demo}", "{demo}", "--verdict-confidence", "1.5"], "verdict_confidence"),
])
def test_verify_usage_errors_exit_2_with_a_message(demo_model, capsys, args, needle):
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(demo=demo_model) for a in args])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_verify_refuses_a_prompts_file_it_cannot_use(demo_model, tmp_path, capsys):
    """Bad input found after start-up is still a usage error (2), never a verdict."""
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"messages": [{"content": "no role"}]}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(demo_model), str(demo_model), "--prompts", str(bad), "--engine", "transformers"])
    assert exit_info.value.code == 2
    assert "expected a list of chat messages" in capsys.readouterr().err
