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
    message = str(exit_info.value.code)
    assert message.startswith("shadowserve: invalid settings:")
    assert "no config.json" in message and "engine" in message


def test_demo_model_command_prints_the_directory(demo_model, capsys):
    main(["demo-model"])
    assert capsys.readouterr().out.strip() == str(demo_model)
