"""Settings: defaults, the shipped file, environment overrides and one message per bad value."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import msgspec
import pytest

from gateway.config import PATH_KEYS, ConfigError, Settings, load, load_settings, redacted, section_types
from gateway.config.admintoken import AdminTokenError, ensure_admin_token, load_admin_token
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


def test_value_errors_list_what_is_allowed(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text('[storage]\nbackend = "s3"\n[minio]\nsecure = "yes"\n[limits]\nmax_image_bytes = "50MB"\n'
                 '[batches]\ntimeout_s = "1h"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(f, env={})
    by_key = {p.split(" ", 1)[0]: p for p in info.value.problems}
    assert "Invalid enum value 's3'; allowed: 'folder', 'minio'" in by_key["storage.backend"]
    assert "Expected `bool`, got `str`; write true or false (without quotes in the file)" in by_key["minio.secure"]
    assert "a number of bytes, e.g. 52428800 for 50 MiB (without quotes in the file)" in (
        by_key["limits.max_image_bytes"])
    assert "a number of seconds" in by_key["batches.timeout_s"]
    with pytest.raises(ConfigError) as env_info:
        load_settings(env={"GATEWAY_CONFIG": "", "GATEWAY_LOG_LEVEL": "loud"})
    assert "allowed: 'debug', 'info', 'warning', 'error'" in env_info.value.problems[0]


def test_relative_paths_are_the_settings_files_not_the_shells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    (site / "config").mkdir(parents=True)
    elsewhere.mkdir()
    f = site / "config" / "gateway.toml"
    f.write_text('[data]\ndir = "../data"\n[keys]\nsecret_file = "../secrets/gateway.key"\n')
    monkeypatch.chdir(elsewhere)
    loaded = load(f, env={"GATEWAY_ADMIN_TOKEN_FILE": "tok"})
    s = loaded.settings
    assert s.data.dir == str(site / "data") and s.data_dir == site / "data"
    assert s.keys.secret_file == str(site / "secrets" / "gateway.key")
    assert s.admin.token_file == str(site / "config" / "tok")  # env values too: the file's folder
    assert loaded.source_of("data", "dir") == "file" and loaded.source_of("admin", "token_file") == (
        "env GATEWAY_ADMIN_TOKEN_FILE")
    assert loaded.source_of("server", "listen") == "default"
    assert "file " + str(f.resolve()) in loaded.describe("data", "dir")


def test_secrets_lose_surrounding_whitespace(tmp_path: Path) -> None:
    (tmp_path / "g.toml").write_text("")
    s = load_settings(tmp_path / "g.toml", env={"GATEWAY_ADMIN_TOKEN": " abcdefghijklmnopq\n",
                                                "GATEWAY_SYNC_TOKEN": "\tzyxwvutsrqponmlk "})
    assert s.admin.token == "abcdefghijklmnopq" and s.sync.token == "zyxwvutsrqponmlk"


def test_the_admin_token_file_is_written_once_and_read_by_the_cli(tmp_path: Path) -> None:
    (tmp_path / "g.toml").write_text("")
    server = load_settings(tmp_path / "g.toml", env={})
    assert server.admin.token == ""
    assert ensure_admin_token(server) == f"new token written to {tmp_path / 'secrets' / 'admin.token'}"
    path = tmp_path / "secrets" / "admin.token"
    assert path.stat().st_mode & 0o777 == 0o600 and (path.parent.stat().st_mode & 0o777) == 0o700
    assert len(server.admin.token) >= 32
    again = load_settings(tmp_path / "g.toml", env={})
    assert ensure_admin_token(again) == f"token file {path}" and again.admin.token == server.admin.token
    cli = load_settings(tmp_path / "g.toml", env={})
    assert load_admin_token(cli) == server.admin.token
    path.write_text("short\n")
    with pytest.raises(AdminTokenError, match="shorter than 16"):
        load_admin_token(load_settings(tmp_path / "g.toml", env={}))
    off = load_settings(tmp_path / "g.toml", env={"GATEWAY_ADMIN_TOKEN_FILE": ""})
    assert ensure_admin_token(off) == "off" and off.admin.token == ""
    nothing = tmp_path / "other"
    nothing.mkdir()
    (nothing / "g.toml").write_text("")
    assert load_admin_token(load_settings(nothing / "g.toml", env={})) == ""
    assert sorted(p.name for p in nothing.iterdir()) == ["g.toml"]  # the CLI creates nothing


def test_the_shipped_file_gives_sizes_their_human_size() -> None:
    for line in (ROOT / "config/gateway.toml").read_text().splitlines():
        if line.split(" = ")[0].endswith("_bytes") and not line.endswith(" = 0"):
            assert re.search(r"= \d+  # \d+ (KiB|MiB|GiB)$", line), line


def test_an_environment_value_gets_no_advice_about_quotes() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"GATEWAY_CONFIG": "", "GATEWAY_MINIO_SECURE": "maybe", "GATEWAY_FORWARD_CONCURRENCY": "x"})
    text = "\n".join(info.value.problems)
    assert "minio.secure = 'maybe' (from env GATEWAY_MINIO_SECURE)" in text and "write true or false" in text
    assert "a whole number" in text and "quotes" not in text
