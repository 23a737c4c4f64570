from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.settings import ApiKey, load_settings
from zimage_edge import cli


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('model = "/models/a"\nport = 9000\n[queue]\nmax_batch = 2\nmax_pending = 5\n')
    monkeypatch.setenv("ZIMAGE_QUEUE__MAX_BATCH", "6")
    monkeypatch.setenv("ZIMAGE_PORT", "9100")
    settings = load_settings(config, port=9200)
    assert settings.model == "/models/a"
    assert settings.queue.max_batch == 6  # the environment overrides the file
    assert settings.queue.max_pending == 5  # the rest of the file's section stays
    assert settings.port == 9200  # a flag overrides both


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('model = "/m"\n[queue]\nmax_batchez = 2\n')
    with pytest.raises(ValueError, match="max_batchez"):
        load_settings(config)


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.toml"
    key = ApiKey.hash("k")
    config.write_text(f'model = "/m"\nhost = "0.0.0.0"\n[[api_keys]]\nname = "kiosk"\nsha256 = "{key}"\n')
    assert cli.main(["serve", "--config", str(config), "--check-config"]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out[: out.rindex("}") + 1])
    assert shown["host"] == "0.0.0.0"
    assert shown["api_keys"][0]["sha256"] == key[:8] + "..."
    assert "configuration OK" in out


def test_check_config_rejects_an_open_network_bind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["serve", "--model", "/m", "--host", "0.0.0.0", "--check-config"])
    assert rc == 2
    assert "without api_keys would expose" in capsys.readouterr().err


def test_hash_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["hash-key", "secret"]) == 0
    assert capsys.readouterr().out.strip() == ApiKey.hash("secret")
