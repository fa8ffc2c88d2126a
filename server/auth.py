"""Device enrolment tokens: issued per job, kept only as sha256 hashes, checked on every call.

A token is 256 random bits (``secrets.token_urlsafe``), shown once when it is made. A device presents it
in each call's metadata as ``authorization: Bearer <token>``; the token names one job, and the device may
register, poll, fetch the bundle and upload for that job only. A hash without a salt is enough here: the
token is random and long, so there is nothing to guess from its hash.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Iterable

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from edgeft.errors import ConfigError, NotFound, Unauthenticated
from edgeft.server.store import tokens, transaction

TOKEN_PREFIX = "eft_"  # makes a leaked token easy to recognise (secret scanners, logs)
METADATA_KEY = "authorization"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token that authenticated the call and the job it enrols the device in."""

    token_id: str
    job_id: str


@dataclass(frozen=True)
class TokenInfo:
    """What is stored about a token (never the token itself)."""

    id: str
    job_id: str
    note: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    def status(self, at: float | None = None) -> str:
        """``valid``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and (at or time.time()) >= self.expires_at:
            return "expired"
        return "valid"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``15m``, ``12h``, ``30d``, ``2w`` or a plain number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text))
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"invalid duration {text!r}: expected a positive number with s, m, h, d or w "
                          "(e.g. 30d, 12h, 3600)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of an ``authorization: Bearer <token>`` metadata entry; Unauthenticated when there is none."""
    for key, value in metadata or ():
        if key.lower() != METADATA_KEY:
            continue
        value = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization metadata must be 'Bearer <enrolment token>'")
        return token.strip()
    raise Unauthenticated("no enrolment token: a device sends 'authorization: Bearer <token>' with every call "
                          "(edgeft client --token-file FILE or EDGEFT_TOKEN); the coordinator's operator makes "
                          "tokens with `edgeft server token create --job JOB`")


class TokenStore:
    """Tokens in the coordinator's database, for the jobs ``job_ids`` (None: any job id is accepted)."""

    def __init__(self, engine: Engine, job_ids: Iterable[str] | None = None, cache_s: float = 0.0):
        self.engine = engine
        self.job_ids = None if job_ids is None else tuple(job_ids)
        # ``[server] token_cache_s``: a valid token's row is read again after this long, so a revocation made
        # elsewhere (the CLI, another replica) takes effect within it; one made here, at once. Expiry is checked
        # on every call. 0: every call reads the database.
        self.cache_s = cache_s
        self._valid: dict[str, tuple[float, TokenInfo]] = {}  # sha256 -> (when read, the token's row)

    def create(self, job_id: str, expires_in_s: float | None = None, note: str = "") -> tuple[TokenInfo, str]:
        """A new token for ``job_id``: (what is stored, the token). The token is not kept; show it once."""
        if self.job_ids is not None and job_id not in self.job_ids:
            raise NotFound(f"no job {job_id!r} in this coordinator's config (jobs: {', '.join(self.job_ids) or 'none'})")
        if expires_in_s is not None and expires_in_s <= 0:
            raise ConfigError(f"invalid expires_in_s={expires_in_s}: must be positive")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        created = time.time()
        info = TokenInfo(id="tok_" + secrets.token_hex(6), job_id=job_id, note=note, created_at=created,
                         expires_at=None if expires_in_s is None else created + expires_in_s, revoked_at=None)
        with transaction(self.engine) as conn:
            conn.execute(insert(tokens).values(id=info.id, job_id=job_id, sha256=hash_token(token), note=note,
                                               created_at=created, expires_at=info.expires_at, revoked_at=None))
        return info, token

    def list(self, job_id: str | None = None) -> list[TokenInfo]:
        query = select(tokens).order_by(tokens.c.created_at)
        if job_id is not None:
            query = query.where(tokens.c.job_id == job_id)
        with transaction(self.engine) as conn:
            return [_info(row) for row in conn.execute(query).all()]

    def revoke(self, token_id: str) -> TokenInfo:
        """Revoke a token by its id; the next call made with it is refused (UNAUTHENTICATED)."""
        with transaction(self.engine) as conn:
            row = conn.execute(select(tokens).where(tokens.c.id == token_id)).first()
            if row is None:
                raise NotFound(f"no token {token_id!r}; `edgeft server token list` shows the ids")
            if row.revoked_at is None:  # the first revocation's time stays
                conn.execute(update(tokens).where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                             .values(revoked_at=time.time()))
                row = conn.execute(select(tokens).where(tokens.c.id == token_id)).first()
        self._valid = {digest: entry for digest, entry in self._valid.items() if entry[1].id != token_id}
        return _info(row)

    def authenticate(self, token: str) -> Principal:
        """The principal of a valid token; Unauthenticated for an unknown, revoked or expired one."""
        digest = hash_token(token)
        read_at, row = self._valid.get(digest, (0.0, None))
        if row is None or time.monotonic() - read_at > self.cache_s:
            with transaction(self.engine) as conn:
                found = conn.execute(select(tokens).where(tokens.c.sha256 == digest)).first()
            if found is None:
                self._valid.pop(digest, None)
                raise Unauthenticated("unknown enrolment token; ask the coordinator's operator for a token of "
                                      "your job")
            row = _info(found)
            if self.cache_s > 0:
                self._valid[digest] = (time.monotonic(), row)
        status = row.status()
        if status != "valid":
            self._valid.pop(digest, None)
            when = row.revoked_at if status == "revoked" else row.expires_at
            verb = "was revoked" if status == "revoked" else "expired"
            raise Unauthenticated(f"enrolment token {row.id} {verb} at "
                                  f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(when))}; ask the "
                                  "coordinator's operator for a new one")
        return Principal(token_id=row.id, job_id=row.job_id)


def _info(row) -> TokenInfo:  # noqa: ANN001
    return TokenInfo(id=row.id, job_id=row.job_id, note=row.note, created_at=row.created_at,
                     expires_at=row.expires_at, revoked_at=row.revoked_at)
