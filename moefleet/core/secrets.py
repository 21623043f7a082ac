"""Secrets at rest: files only their owner reads, generated passwords, URLs with the password hidden.

Nothing here logs or returns a secret in an error message: errors name the
file or the setting, never its content.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = ["generate_secret", "write_private_file", "read_secret_file", "redact_url", "SecretFileError"]


class SecretFileError(ValueError):
    """A secret file that cannot be read, is empty, or is readable by other users."""


def generate_secret(nbytes: int = 32) -> str:
    """A random URL-safe secret of ``nbytes`` random bytes (``secrets.token_urlsafe``)."""
    return secrets.token_urlsafe(nbytes)


def write_private_file(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` with mode 0600 (created so, never readable by others even for a moment)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return path


def read_secret_file(path: str | os.PathLike[str], what: str, *, private: bool = False) -> str:
    """The stripped content of a secret file; ``what`` names the setting in errors.

    private: refuse a file that users other than its owner may read (group or
    world bits set), as ssh does for private keys.
    """
    p = Path(path)
    try:
        text = p.read_text().strip()
        mode = p.stat().st_mode
    except OSError as e:
        raise SecretFileError(f"{what}: cannot read {str(p)!r}: {e.strerror}") from None
    if not text:
        raise SecretFileError(f"{what}: {str(p)!r} is empty")
    if private and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretFileError(f"{what}: {str(p)!r} is readable by other users (mode {oct(mode & 0o777)}); chmod 600 it")
    return text


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs, errors and status output)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
