"""API key format and hashing: authz issues keys, the gateway checks them.

A key reads ``stw_<8-char id>_<32-char secret>`` in base62. Only HMAC-SHA-256(pepper, key) is
stored; the id locates the row, and the digest is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string

PREFIX = "stw_"
ALPHABET = string.ascii_letters + string.digits
ID_LENGTH = 8
SECRET_LENGTH = 32
KEY_PATTERN = re.compile(rf"^stw_([0-9A-Za-z]{{{ID_LENGTH}}})_[0-9A-Za-z]{{{SECRET_LENGTH}}}$")


def _random(length: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def generate() -> tuple[str, str]:
    """A new key: ``(key_id, full_key)``. The full key is shown once and never stored."""
    key_id = _random(ID_LENGTH)
    return key_id, f"{PREFIX}{key_id}_{_random(SECRET_LENGTH)}"


def key_id_of(key: str) -> str | None:
    """The id of a well-formed key, else None (cheap to reject garbage before any lookup)."""
    match = KEY_PATTERN.match(key)
    return match.group(1) if match else None


def digest(pepper: bytes, key: str) -> str:
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()


def matches(pepper: bytes, key: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(pepper, key), stored_digest)
