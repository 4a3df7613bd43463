"""The admin token file: written once by the server, read by server and CLI alike.

With `[admin] token` empty, the token lives in `[admin] token_file` (default `secrets/admin.token`
next to the key secret). The server's first start writes a new random token there (0600), so the
CLI on the same host finds it without any variable to copy between shells.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from gateway.config.model import Settings

MIN_LENGTH = 16


class AdminTokenError(Exception):
    """The token file exists but cannot be used; the message names it and says why."""


def read_token_file(path: Path) -> str | None:
    """The token in `path` (surrounding whitespace stripped), None when the file does not exist."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except PermissionError:
        raise AdminTokenError(f"the admin token file {path} is not readable by this user; run the CLI as "
                              "the user the server runs as, or set GATEWAY_ADMIN_TOKEN") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminTokenError(f"the admin token file {path} cannot be read: {exc}") from None
    if len(token) < MIN_LENGTH:
        raise AdminTokenError(f"the admin token in {path} is shorter than {MIN_LENGTH} characters; "
                              "delete the file to have the server write a new one at its next start")
    return token


def load_admin_token(settings: Settings) -> str:
    """For the CLI: the admin token from the settings or the token file, '' when there is none.
    Never creates anything."""
    if settings.admin.token or not settings.admin.token_file:
        return settings.admin.token
    token = read_token_file(Path(settings.admin.token_file))
    if token:
        settings.admin.token = token
    return settings.admin.token


def ensure_admin_token(settings: Settings) -> str:
    """For the server: the admin token, written to the token file (0600) with a new random one when
    neither the setting nor the file has one. Returns where it came from, for the start-up line."""
    if settings.admin.token:
        return "setting admin.token"
    if not settings.admin.token_file:
        return "off"
    path = Path(settings.admin.token_file)
    token = read_token_file(path)
    if token is None:
        token = secrets.token_urlsafe(32)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
        settings.admin.token = token
        return f"new token written to {path}"
    settings.admin.token = token
    return f"token file {path}"
