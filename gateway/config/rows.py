"""Settings as rows for people: `section.key`, the value (secrets redacted) and where it came from."""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.config.loading import LoadedSettings
from gateway.config.model import SECRET_KEYS, Settings
from gateway.humanize import human_bytes


def settings_rows(settings: Settings, loaded: LoadedSettings | None) -> list[dict[str, Any]]:
    """One row per key: `key`, `value` (secrets as `<redacted>`), `shown` (sizes with their human
    size) and `source` (default, file, env VAR, command line, token file)."""
    rows: list[dict[str, Any]] = []
    for section, values in msgspec.to_builtins(settings).items():
        for key, value in values.items():
            source = loaded.source_of(section, key) if loaded is not None else "unknown"
            if source == "file" and loaded is not None and loaded.file is not None:
                source = f"file {loaded.file}"
            if (section, key) in SECRET_KEYS and value:
                value = "<redacted>"
            shown = repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) \
                else str(value)
            if key.endswith("_bytes") and isinstance(value, int) and value:
                shown += f" ({human_bytes(value)})"
            rows.append({"key": f"{section}.{key}", "value": value, "shown": shown, "source": source})
    return rows
