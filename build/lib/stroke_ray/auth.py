"""Bearer tokens for the HTTP service: where they come from and how they are checked.

A token is read from a file (`--token-file` or `STROKE_RAY_SERVE_TOKEN_FILE`) or from the
`STROKE_RAY_SERVE_TOKEN` environment variable, never from a command-line argument (which
would land in the shell history and in `ps`). Only its SHA-256 digest travels further: to
the replicas (as a deployment argument, which Serve keeps in its checkpoint) and to the
proxy guard, so neither the controller's state nor the dashboard ever shows the token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path

from stroke_ray.errors import StrokeRayError

__all__ = [
    "MIN_TOKEN_LENGTH",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "bearer_matches",
    "is_loopback",
    "load_token",
    "token_digest",
]

TOKEN_ENV = "STROKE_RAY_SERVE_TOKEN"
TOKEN_FILE_ENV = "STROKE_RAY_SERVE_TOKEN_FILE"
# 16 characters of `secrets.token_urlsafe` carry ~96 bits; shorter ones are guessable.
MIN_TOKEN_LENGTH = 16


def load_token(token_file: str | Path | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The service token: from `token_file`, else `$STROKE_RAY_SERVE_TOKEN_FILE`, else
    `$STROKE_RAY_SERVE_TOKEN`; None when none is set.

    Args:
        token_file: a file holding the token (surrounding whitespace is ignored).
        environ: the environment to read (default `os.environ`).

    Raises:
        StrokeRayError: the file is missing or unreadable, or the token is shorter than
            `MIN_TOKEN_LENGTH` characters or contains whitespace.
    """
    env = os.environ if environ is None else environ
    source, token = None, None
    path = token_file or env.get(TOKEN_FILE_ENV) or None
    if path is not None:
        source = str(path)
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise StrokeRayError(f"{path}: cannot read the token file ({exc.strerror or exc})") from None
    elif env.get(TOKEN_ENV):
        source, token = f"${TOKEN_ENV}", env[TOKEN_ENV].strip()
    if token is None:
        return None
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise StrokeRayError(
            f"{source}: the token must be one word of at least {MIN_TOKEN_LENGTH} characters "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def token_digest(token: str) -> str:
    """Hex SHA-256 of the token: what replicas and the proxy guard compare against."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_matches(authorization: str | None, digest: str | None) -> bool:
    """Whether an `Authorization` header carries the token whose digest is `digest`.

    True when no token is configured (`digest` None). The comparison is constant-time.
    """
    if digest is None:
        return True
    if not authorization:
        return False
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    return hmac.compare_digest(token_digest(presented.strip()), digest)


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); False for 0.0.0.0,
    a LAN or public address, or a name other than localhost."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
