"""Loading settings: defaults, then a TOML file, then `GATEWAY_<SECTION>_<KEY>` environment variables.

Loading never stops at the first problem: every bad value gets one message naming the key, where it
came from and what is allowed. Relative paths are taken from the settings file's folder (with no
settings file, from the current folder), so the CLI run from elsewhere finds the server's files.
Each value's source (default, file, env) is kept for `gateway config`.
"""

from __future__ import annotations

import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from gateway.config.model import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    PATH_KEYS,
    SECRET_KEYS,
    Settings,
    _Section,
)
from gateway.forward import uplink_config


class ConfigError(Exception):
    """Settings could not be loaded; `problems` holds one message per bad value."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class LoadedSettings:
    """Settings with where each value came from: `sources["server.listen"]` is `default`, `file`,
    `env GATEWAY_SERVER_LISTEN` or `command line`."""

    settings: Settings
    file: Path | None  # the settings file read, None when there was none
    base: Path  # relative paths were taken from here
    sources: dict[str, str] = field(default_factory=dict)

    def source_of(self, section: str, key: str) -> str:
        return self.sources.get(f"{section}.{key}", "default")

    def describe(self, section: str, key: str) -> str:
        """`server.listen = '0.0.0.0:8080' (default)`, for messages that tell people which setting to change."""
        value = getattr(getattr(self.settings, section), key)
        where = self.source_of(section, key)
        where = f"file {self.file}" if where == "file" else where
        return f"{section}.{key} = {value!r} ({where})"


def section_types() -> dict[str, type[_Section]]:
    return {f.name: f.type for f in msgspec.structs.fields(Settings)}


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Load settings: defaults, then the TOML file, then environment overrides (see `load`)."""
    return load(path, env).settings


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> LoadedSettings:
    """Settings and their sources.

    `path` None means `GATEWAY_CONFIG` or else `config/gateway.toml` if it exists. A file named
    explicitly (argument or `GATEWAY_CONFIG`) that is missing is an error.
    """
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get("GATEWAY_CONFIG"))
    file_path = Path(path) if path is not None else Path(env.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH)
    problems: list[str] = []
    raw: dict[str, Any] = {}
    found = file_path.is_file()
    if found:
        try:
            raw = tomllib.loads(file_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError([f"config file {file_path}: cannot be read: {exc}"]) from exc
    elif explicit:
        raise ConfigError([f"config file {file_path}: not found"])
    source_name = str(file_path)

    sections = section_types()
    values: dict[str, dict[str, tuple[Any, str]]] = {name: {} for name in sections}
    for name, value in raw.items():
        if name not in sections:
            problems.append(f"[{name}] (from {source_name}): unknown section; known: {', '.join(sections)}")
            continue
        if not isinstance(value, dict):
            problems.append(f"[{name}] (from {source_name}): must be a table")
            continue
        for key, item in value.items():
            values[name][key] = (item, source_name)
    for var, item in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("_")
        # Other GATEWAY_* variables (GATEWAY_CONFIG, GATEWAY_VENV, tests' own) are not settings.
        if section in sections and key:
            values[section][key] = (item, f"env {var}")

    built: dict[str, _Section] = {}
    for name, cls in sections.items():
        fields = {f.name: f for f in msgspec.structs.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, (item, source) in values[name].items():
            fld = fields.get(key)
            if fld is None:
                problems.append(f"{name}.{key} (from {source}): unknown key; known: {', '.join(fields)}")
                continue
            if isinstance(item, str) and (name, key) in SECRET_KEYS:
                item = item.strip()  # a pasted secret's stray space or newline is no part of it
            try:
                kwargs[key] = msgspec.convert(item, fld.type, strict=not source.startswith("env "))
            except msgspec.ValidationError as exc:
                shown = "<redacted>" if (name, key) in SECRET_KEYS else repr(item)
                why = explain(fld.type, key, str(exc), from_env=source.startswith("env "))
                problems.append(f"{name}.{key} = {shown} (from {source}): {why}")
        built[name] = cls(**kwargs)
    settings = Settings(**built)  # type: ignore[arg-type]
    base = file_path.parent.resolve() if found else Path.cwd()
    resolve_paths(settings, base)
    problems.extend(_cross_checks(settings, values))
    if problems:
        raise ConfigError(problems)
    sources = {
        f"{section}.{key}": ("env " + src[4:] if src.startswith("env ") else "file")
        for section, items in values.items() for key, (_, src) in items.items()
    }
    return LoadedSettings(settings, file_path.resolve() if found else None, base, sources)


def resolve_paths(settings: Settings, base: Path) -> None:
    """Make every path setting absolute, relative ones taken from `base` (never the shell's folder
    unless it is the base)."""
    for section, key in PATH_KEYS:
        part = getattr(settings, section)
        value: str = getattr(part, key)
        if value:
            setattr(part, key, str((base / Path(value).expanduser()).resolve()))


def explain(kind: Any, key: str, message: str, from_env: bool = False) -> str:
    """msgspec's reason, with what would be allowed: the choices of an enum, true/false, the unit."""
    unquote = "" if from_env else " (without quotes in the file)"
    reason = message.replace(" - at `$`", "")
    inner = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Annotated else kind
    if typing.get_origin(inner) is Literal:
        choices = ", ".join(repr(c) for c in typing.get_args(inner))
        return f"{reason}; allowed: {choices}"
    if inner is bool:
        return f"{reason}; write true or false" + (unquote if "got `str`" in reason else "")
    if inner in (int, float):
        if key.endswith("_bytes"):
            unit = "a number of bytes, e.g. 52428800 for 50 MiB"
        elif key.endswith("_s"):
            unit = "a number of seconds"
        elif key.endswith("_days"):
            unit = "a number of days"
        else:
            unit = "a whole number" if inner is int else "a number"
        return f"{reason}; {unit}" + (unquote if "got `str`" in reason else "")
    return reason


def _where(values: dict[str, dict[str, tuple[Any, str]]], section: str, key: str) -> str:
    entry = values[section].get(key)
    return entry[1] if entry else "default"


def _cross_checks(s: Settings, values: dict[str, dict[str, tuple[Any, str]]]) -> list[str]:
    problems: list[str] = []

    def bad(section: str, key: str, message: str) -> None:
        problems.append(f"{section}.{key} (from {_where(values, section, key)}): {message}")

    problems.extend(check_listen(s.server.listen, _where(values, "server", "listen")))
    if bool(s.server.certfile) != bool(s.server.keyfile):
        bad("server", "certfile", "certfile and keyfile must be set together")
    for key in ("certfile", "keyfile"):
        value = getattr(s.server, key)
        if value and not Path(value).is_file():
            bad("server", key, f"{value!r}: no such file")
    if s.storage.backend == "minio" and not s.minio.endpoint:
        bad("minio", "endpoint", "required when storage.backend = 'minio'")
    if s.minio.endpoint and ("/" in s.minio.endpoint or ":" not in s.minio.endpoint):
        bad("minio", "endpoint", f"{s.minio.endpoint!r} must be HOST:PORT, without a scheme")
    if s.cloud.url:
        parts = urlsplit(s.cloud.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            bad("cloud", "url", f"{s.cloud.url!r} must be an http:// or https:// URL")
    if s.server.external_url:
        parts = urlsplit(s.server.external_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            bad("server", "external_url", f"{s.server.external_url!r} must be an http:// or https:// URL")
    if s.provisioning_mode == "relay":
        if not s.cloud.url:
            bad("provisioning", "mode", "relay needs cloud.url")
        if not s.server.external_url and s.provisioning.mode == "relay":
            bad("server", "external_url", "required with provisioning.mode = 'relay'; set it to the device base URL, "
                "e.g. http://gateway.lan:8080/api, or leave provisioning.mode = 'auto' (the URL a request came in on)")
    if s.sync.token and len(s.sync.token) < 16:
        bad("sync", "token", "must be at least 16 characters")
    if s.admin.token and len(s.admin.token) < 16:
        bad("admin", "token", "must be at least 16 characters")
    if s.forward.backoff_max_s < s.forward.backoff_base_s:
        bad("forward", "backoff_max_s", "must be at least forward.backoff_base_s")
    for p in uplink_config.problems(s.forward.classes, s.forward.windows, s.forward.timezone,
                                    s.forward.bandwidth_bytes_per_s):  # "forward.KEY...: message"
        head, _, reason = p.partition(": ")
        key = head.removeprefix("forward.").split("[")[0]
        problems.append(f"{head} (from {_where(values, 'forward', key)}): {reason}")
    return problems


def check_listen(listen: str, source: str) -> list[str]:
    """`server.listen` must be HOST:PORT with a port in 1..65535 (also `serve --listen`)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return [f"server.listen (from {source}): {listen!r} is not HOST:PORT with a port in 1..65535, "
                "e.g. 0.0.0.0:8080 (every interface) or 127.0.0.1:8080 (this PC only)"]
    return []


def redacted(settings: Settings) -> dict[str, Any]:
    """Settings as plain data with secrets replaced, for showing to people."""
    data: dict[str, Any] = msgspec.to_builtins(settings)
    for section, key in SECRET_KEYS:
        if data[section][key]:
            data[section][key] = "<redacted>"
    return data
