"""Fixtures for the coordinator tests."""

from conftest_server import shards  # noqa: F401
