"""Enrolment tokens (server/auth.py): the cache of valid tokens and when a revocation takes effect. The tokens seen
from the wire (UNAUTHENTICATED on every method, expired, another job's) are in test_security.py."""

from __future__ import annotations

import time

import pytest

from edgeft.errors import Unauthenticated
from edgeft.server.auth import TokenStore
from edgeft.server.store import open_database


def test_a_token_revoked_elsewhere_is_refused_once_the_cache_lapses_and_one_revoked_here_at_once(tmp_path):
    engine = open_database(tmp_path / "state.db")
    try:
        here, elsewhere = TokenStore(engine, cache_s=0.5), TokenStore(engine)  # elsewhere: the CLI, a replica
        info, token = elsewhere.create("job")
        assert here.authenticate(token).token_id == info.id
        elsewhere.revoke(info.id)
        assert here.authenticate(token).token_id == info.id  # the row read a moment ago is trusted meanwhile
        time.sleep(0.6)
        with pytest.raises(Unauthenticated, match=f"{info.id} was revoked"):
            here.authenticate(token)
        with pytest.raises(Unauthenticated, match=f"{info.id} was revoked"):  # and stays refused
            here.authenticate(token)

        info, token = here.create("job")
        assert here.authenticate(token).job_id == "job"
        here.revoke(info.id)  # revoked by the coordinator's own store: the cache forgets it at once
        with pytest.raises(Unauthenticated, match="was revoked"):
            here.authenticate(token)

        info, token = elsewhere.create("job")
        uncached = TokenStore(engine)  # token_cache_s = 0: every call reads the database
        assert uncached.authenticate(token).token_id == info.id
        elsewhere.revoke(info.id)
        with pytest.raises(Unauthenticated, match="was revoked"):
            uncached.authenticate(token)
        with pytest.raises(Unauthenticated, match="unknown enrolment token"):
            here.authenticate("eft_not-a-token")
    finally:
        engine.dispose()


def test_an_expired_token_is_refused_even_while_its_row_is_cached(tmp_path):
    engine = open_database(tmp_path / "state.db")
    try:
        tokens = TokenStore(engine, cache_s=60)
        info, token = tokens.create("job", expires_in_s=0.3)
        assert tokens.authenticate(token).token_id == info.id
        time.sleep(0.4)
        with pytest.raises(Unauthenticated, match=f"{info.id} expired"):
            tokens.authenticate(token)
    finally:
        engine.dispose()
