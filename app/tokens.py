"""API tokens and their scopes, parsed from `RADCOHORT_API_TOKENS`.

Each comma-separated entry is either

* `token` — a plain token (the syntax before scopes existed): every scope except the identified
  ones (`DEFAULT_SCOPES`); its audit actor is `token:` + the first 12 hex digits of its SHA-256;
* `name:token:scope1+scope2` — a named token with exactly these scopes; audit actor `token:name`.

Tokens are 1-256 visible ASCII characters without `,` or `:` (they travel in an HTTP header).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

# what a token may do; only `find-identified` is enforced so far (app.api.routes.pacs), the rest are
# declared so that routes can require them with app.api.deps.require_scope(...)
SCOPES = ("read", "retrieve", "train", "export", "find-identified", "export-identified")
IDENTIFIED_SCOPES = frozenset({"find-identified", "export-identified"})
DEFAULT_SCOPES = frozenset(SCOPES) - IDENTIFIED_SCOPES

_TOKEN_RE = re.compile(r"^[\x21-\x7e]{1,256}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class ApiToken:
    """One configured bearer token: its secret (bytes, compared in constant time), actor and scopes."""

    secret: bytes
    actor: str
    scopes: frozenset[str]

    def matches(self, given: bytes) -> bool:
        return hmac.compare_digest(given, self.secret)


def _plain_actor(token: str) -> str:
    # an actor name for the audit log that never reveals the token
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def parse_tokens(raw: str | None) -> list[ApiToken]:
    """Parse the setting; ValueError names the bad entry by position (never echoes a secret)."""
    out: list[ApiToken] = []
    names: set[str] = set()
    for i, entry in enumerate((e.strip() for e in (raw or "").split(",")), start=1):
        if not entry:
            continue
        if ":" not in entry:
            if not _TOKEN_RE.match(entry):
                raise ValueError(f"api_tokens entry {i}: a token is 1-256 visible ASCII characters")
            out.append(ApiToken(entry.encode(), _plain_actor(entry), DEFAULT_SCOPES))
            continue
        parts = entry.split(":")
        if len(parts) != 3:
            raise ValueError(f"api_tokens entry {i}: expected 'token' or 'name:token:scope1+scope2' "
                             f"(a token may not contain ':')")
        name, token, scope_text = parts
        if not _NAME_RE.match(name):
            raise ValueError(f"api_tokens entry {i}: name must be 1-64 of letters, digits, '.', '_', '-'")
        if name in names:
            raise ValueError(f"api_tokens entry {i}: duplicate name {name!r}")
        if not _TOKEN_RE.match(token):
            raise ValueError(f"api_tokens entry {i} ({name}): a token is 1-256 visible ASCII characters")
        scopes = frozenset(s.strip() for s in scope_text.split("+") if s.strip())
        unknown = sorted(scopes - set(SCOPES))
        if unknown or not scopes:
            raise ValueError(f"api_tokens entry {i} ({name}): unknown or missing scope(s) {unknown}; "
                             f"known: {', '.join(SCOPES)}")
        names.add(name)
        out.append(ApiToken(token.encode(), f"token:{name}", scopes))
    return out


def authenticate(tokens: list[ApiToken], given: bytes | None) -> ApiToken | None:
    """The token `given` is (any byte string; compared with every configured one), or None."""
    if not given:
        return None
    found = None
    for t in tokens:  # no early exit: the time taken does not say which entry matched
        if t.matches(given):
            found = found or t
    return found
