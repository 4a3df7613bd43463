"""Typed settings: defaults, then a TOML file, then `GATEWAY_<SECTION>_<KEY>` environment variables.

`model` holds the settings' shape (every key's type, default and help), `loading` reads them and
keeps where each value came from, `admintoken` the admin token file. No I/O happens at import time.
"""

from gateway.config.loading import (
    ConfigError,
    LoadedSettings,
    check_listen,
    load,
    load_settings,
    redacted,
    section_types,
)
from gateway.config.model import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    PATH_KEYS,
    SECRET_KEYS,
    AdminSettings,
    BatchSettings,
    CloudSettings,
    DataSettings,
    DedupSettings,
    ForwardSettings,
    GiB,
    KeySettings,
    LimitSettings,
    LogSettings,
    MiB,
    MinioSettings,
    ProvisioningSettings,
    ServerSettings,
    Settings,
    StorageSettings,
    SyncSettings,
)

__all__ = [
    "DEFAULT_CONFIG_PATH", "ENV_PREFIX", "PATH_KEYS", "SECRET_KEYS", "AdminSettings", "BatchSettings", "CloudSettings",
    "ConfigError", "DataSettings", "DedupSettings", "ForwardSettings", "GiB", "KeySettings", "LimitSettings",
    "LoadedSettings", "LogSettings", "MiB", "MinioSettings", "ProvisioningSettings", "ServerSettings", "Settings",
    "StorageSettings", "SyncSettings", "check_listen", "load", "load_settings", "redacted", "section_types",
]
