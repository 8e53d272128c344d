"""Bearer-token check for local runs, matching Anyscale's query-token behaviour."""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Optional

API_KEY_ENV = "SERVE_TP_API_KEY"


def api_key_digest(environ=os.environ) -> Optional[str]:
    """sha256 of the configured key, so the key itself never lands in Serve's config."""
    key = environ.get(API_KEY_ENV)
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def authorized(authorization: Optional[str], digest: Optional[str]) -> bool:
    """True when no key is configured, or the header carries it (constant-time compare)."""
    if digest is None:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    offered = hashlib.sha256(token.strip().encode()).hexdigest()
    return hmac.compare_digest(offered, digest)
