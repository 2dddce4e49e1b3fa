"""Who may reach the page, and how much one upload may weigh.

The page binds to the loopback address unless told otherwise; any other address exposes it to
the network, so it then needs passwords (``--auth USER:PASSWORD`` or ``--auth-file FILE``).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from gpen_video.errors import ConfigError

DEFAULT_MAX_UPLOAD = 8 * 1000**3
"""Bytes; ``--max-upload`` default (8 GB)."""

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``8GB``, ``500MB``, ``1.5GiB`` or ``1000000`` (kB, MB, GB, TB are
    powers of 1000; KiB, MiB, GiB, TiB powers of 1024).

    >>> parse_size("8GB"), parse_size("2MiB")
    (8000000000, 2097152)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise ConfigError(f"size {text!r} is not a size such as 8GB or 500MB")
    value = float(match.group(1)) * _UNITS[match.group(2) or ""]
    if value < 1:
        raise ConfigError(f"size {text!r} must be at least one byte")
    return int(value)


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _pair(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"{where} must be USER:PASSWORD with both parts non-empty")
    return user, password


def read_auth(auth: str | None, auth_file: str | Path | None) -> list[tuple[str, str]]:
    """The accounts of ``--auth USER:PASSWORD`` and of ``--auth-file`` (one ``USER:PASSWORD``
    a line; blank lines and lines starting with ``#`` are skipped)."""
    accounts = [_pair(auth, "--auth")] if auth is not None else []
    if auth_file is not None:
        path = Path(auth_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read the --auth-file {path} ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--auth-file {path} is not a UTF-8 text file of USER:PASSWORD lines") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                accounts.append(_pair(line, f"line {number} of {path}"))
        if not accounts:
            raise ConfigError(f"--auth-file {path} holds no USER:PASSWORD line")
    return accounts


def check_binding(host: str, accounts: list[tuple[str, str]]) -> None:
    """Refuse to expose the page beyond this machine without passwords."""
    if not is_loopback(host) and not accounts:
        raise ConfigError(
            f"--host {host} makes the page reachable from other machines; "
            "give --auth USER:PASSWORD or --auth-file FILE too"
        )
