"""Settings: defaults, the shipped file, environment overrides and one message per bad value."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import msgspec
import pytest

from gateway.config import PATH_KEYS, ConfigError, Settings, load_settings, redacted, section_types
from gateway.config.loading import resolve_paths

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_file_lists_every_key_with_its_default() -> None:
    import tomllib

    shipped = tomllib.loads((ROOT / "config/gateway.toml").read_text())
    defaults = msgspec.to_builtins(Settings())
    assert set(shipped) == set(defaults)
    for section, key in PATH_KEYS:  # relative to config/ there, to the project folder as defaults
        default, given = defaults[section].pop(key), shipped[section].pop(key)
        if default or given:
            assert (ROOT / "config" / given).resolve() == (ROOT / default).resolve(), f"{section}.{key}"
    for section, values in defaults.items():
        assert shipped[section] == values, section
    # every key carries help text
    for cls in section_types().values():
        hints = typing.get_type_hints(cls, include_extras=True)
        for field in msgspec.structs.fields(cls):
            metas = [m for m in typing.get_args(hints[field.name])[1:] if isinstance(m, msgspec.Meta)]
            assert metas and metas[0].description, f"{cls.__name__}.{field.name} has no help"


def test_missing_default_file_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    defaults = Settings()
    resolve_paths(defaults, tmp_path)  # with no settings file, relative paths are the current folder's
    assert load_settings(env={}) == defaults


def test_named_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(env={"GATEWAY_CONFIG": str(tmp_path / "nope.toml")})


def test_env_overrides_file(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text('[server]\nlisten = "127.0.0.1:9000"\n[batches]\nmax_images = 7\n')
    s = load_settings(f, env={"GATEWAY_BATCHES_MAX_IMAGES": "9", "GATEWAY_MINIO_SECURE": "true",
                              "GATEWAY_CONFIG_UNRELATED": "x", "GATEWAY_TEST_S3_ENDPOINT": "y"})
    assert s.server.listen == "127.0.0.1:9000"
    assert s.batches.max_images == 9
    assert s.minio.secure is True


def test_every_bad_value_gets_its_own_message_naming_key_and_source(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text(
        '[server]\nlisten = "nonsense"\nupload_success_status = 202\n'
        '[storage]\nbackend = "tape"\n[batches]\nmax_images = 0\nbogus = 1\n[nosuch]\nx = 1\n'
    )
    with pytest.raises(ConfigError) as info:
        load_settings(f, env={"GATEWAY_FORWARD_CONCURRENCY": "many", "GATEWAY_LIMITS_NOPE": "1"})
    problems = info.value.problems
    text = "\n".join(problems)
    assert len(problems) == 8, text
    assert any(p.startswith("server.listen") and str(f) in p for p in problems)
    assert any(p.startswith("server.upload_success_status") for p in problems)
    assert any(p.startswith("storage.backend") and "tape" in p for p in problems)
    assert any(p.startswith("batches.max_images") and ">= 1" in p for p in problems)
    assert any(p.startswith("batches.bogus") and "unknown key" in p for p in problems)
    assert any(p.startswith("[nosuch]") and "unknown section" in p for p in problems)
    assert any(p.startswith("forward.concurrency") and "env GATEWAY_FORWARD_CONCURRENCY" in p for p in problems)
    assert any(p.startswith("limits.nope") and "unknown key" in p for p in problems)


def test_minio_backend_needs_an_endpoint() -> None:
    with pytest.raises(ConfigError, match=r"minio\.endpoint"):
        load_settings(env={"GATEWAY_CONFIG": "", "GATEWAY_STORAGE_BACKEND": "minio"}, path=None)


def test_secrets_are_redacted() -> None:
    s = Settings()
    s.minio.secret_key = "s3cr3t"
    s.admin.token = "a" * 20
    shown = redacted(s)
    assert shown["minio"]["secret_key"] == "<redacted>"
    assert shown["admin"]["token"] == "<redacted>"
    assert "s3cr3t" not in str(shown)


def test_bad_secret_value_is_not_echoed(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text('[minio]\nsecret_key = 12345\n')
    with pytest.raises(ConfigError) as info:
        load_settings(f, env={})
    assert "12345" not in str(info.value)


def test_cli_exits_non_zero_with_messages_before_listening(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text('[server]\nlisten = "127.0.0.1:99999"\n[dedup]\nscope = "planet"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(f), "serve"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "server.listen" in result.stderr and "dedup.scope" in result.stderr
    assert not (tmp_path / "data").exists()  # nothing was created, nothing listened


def test_provisioning_mode_follows_the_cloud_and_relay_needs_the_external_url() -> None:
    assert load_settings(env={"GATEWAY_CONFIG": ""}, path=None).provisioning_mode == "local"
    # A cloud makes relay the default; without an external URL the URL a request came in on is used.
    auto = load_settings(env={"GATEWAY_CONFIG": "", "GATEWAY_CLOUD_URL": "https://acusight.io/api"}, path=None)
    assert auto.provisioning_mode == "relay"
    with pytest.raises(ConfigError) as info:  # relay chosen explicitly needs the external URL
        load_settings(env={"GATEWAY_CONFIG": "", "GATEWAY_CLOUD_URL": "https://acusight.io/api",
                           "GATEWAY_PROVISIONING_MODE": "relay"}, path=None)
    assert [p for p in info.value.problems if p.startswith("server.external_url (from ")], info.value.problems
    relay = load_settings(env={"GATEWAY_CONFIG": "", "GATEWAY_CLOUD_URL": "https://acusight.io/api",
                               "GATEWAY_SERVER_EXTERNAL_URL": "http://gw.lan:8080/api"}, path=None)
    assert relay.provisioning_mode == "relay"
    local = load_settings(env={"GATEWAY_CONFIG": "", "GATEWAY_CLOUD_URL": "https://acusight.io/api",
                               "GATEWAY_PROVISIONING_MODE": "local"}, path=None)
    assert local.provisioning_mode == "local"
    with pytest.raises(ConfigError, match=r"provisioning\.mode .*relay needs cloud\.url"):
        load_settings(env={"GATEWAY_CONFIG": "", "GATEWAY_PROVISIONING_MODE": "relay",
                           "GATEWAY_SERVER_EXTERNAL_URL": "http://gw.lan:8080/api"}, path=None)
    with pytest.raises(ConfigError, match=r"server\.external_url"):
        load_settings(env={"GATEWAY_CONFIG": "", "GATEWAY_SERVER_EXTERNAL_URL": "gw.lan:8080"}, path=None)
