"""The one error hierarchy of edgeft.

Every error a user can cause (bad input, a corrupt file, an unsupported model) is an ``EdgeftError``
whose message names the problem and what to do. ``grpc_code`` is the gRPC status name the coordinator
answers with when the error crosses the wire.
"""

from __future__ import annotations


class EdgeftError(Exception):
    """Base class of every error edgeft raises on purpose.

    ``reason`` is a short category (``"shape"``, ``"norm"``, ``"late"``...) under which the coordinator counts
    the refusals it answers; empty when the error class says enough."""

    grpc_code = "INTERNAL"
    reason = ""

    def __init__(self, *args: object, reason: str = ""):
        super().__init__(*args)
        if reason:
            self.reason = reason


class ConfigError(EdgeftError):
    """A configuration value is invalid (names the field and the value)."""

    grpc_code = "INVALID_ARGUMENT"


class DataError(EdgeftError):
    """A data file cannot be used: missing file or column, unknown label, bad value."""

    grpc_code = "INVALID_ARGUMENT"


class ExportError(EdgeftError):
    """A model cannot be exported into training artifacts."""

    grpc_code = "FAILED_PRECONDITION"


class BundleError(EdgeftError):
    """A bundle is incomplete, corrupt or incompatible (missing file, sha256 mismatch, bad manifest)."""

    grpc_code = "DATA_LOSS"


class StateError(EdgeftError):
    """The coordinator's state folder (database or artifact store) is unreadable or corrupt."""

    grpc_code = "DATA_LOSS"


class Unavailable(EdgeftError):
    """A service the coordinator needs (its database) cannot be reached or did not answer now; nothing was
    applied, and the same call later may succeed (agents retry it)."""

    grpc_code = "UNAVAILABLE"


class TrainingError(EdgeftError):
    """On-device training failed (for example, the loss became NaN)."""

    grpc_code = "ABORTED"


class WireError(EdgeftError):
    """A message from the wire is malformed (bad shape, dtype, offsets, sizes or values)."""

    grpc_code = "INVALID_ARGUMENT"
    reason = "malformed"


class NotFound(EdgeftError):
    """No such job, round, device or bundle on the coordinator."""

    grpc_code = "NOT_FOUND"


class Rejected(EdgeftError):
    """A well-formed request that the round's state refuses (late, closed, not selected)."""

    grpc_code = "FAILED_PRECONDITION"


class CoordinatorError(EdgeftError):
    """The coordinator refused an agent's request in a way retrying will not fix (or stayed unreachable)."""

    grpc_code = "FAILED_PRECONDITION"


class Unauthenticated(EdgeftError):
    """A request without a valid credential: no enrolment token, or an unknown, revoked or expired one."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(EdgeftError):
    """An authenticated caller asked for something its credential does not cover (another job's bundle,
    task or round)."""

    grpc_code = "PERMISSION_DENIED"


class SecAggError(EdgeftError):
    """Secure aggregation cannot go on: too few clients left for the threshold (the round aborts and no input
    is revealed), a share or key that does not check out, a message for the wrong phase."""

    grpc_code = "FAILED_PRECONDITION"
    reason = "secagg"


def check_config(cond: bool, name: str, value: object, why: str) -> None:
    """The one configuration check: ``ConfigError("invalid {name}={value!r}: {why}")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"invalid {name}={value!r}: {why}")
