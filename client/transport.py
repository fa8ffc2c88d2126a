"""How a device reaches the coordinator: TLS by default (with a client certificate for mutual TLS), plaintext
only when asked for, its enrolment token on every call, message size limits and keepalive.

gRPC does the TLS itself; this module only picks the credentials and channel arguments.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

from edgeft.errors import ConfigError
from edgeft.wire.types import MAX_MESSAGE_BYTES, MIN_MESSAGE_BYTES

log = logging.getLogger("edgeft.client")
TOKEN_ENV = "EDGEFT_TOKEN"
# a busy or restarting coordinator: the call was not applied, ask again later (with backoff)
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})
# INTERNAL comes from gRPC itself too, not only from the coordinator (whose handlers leave the call unapplied):
# "Internal error from Core" when a coordinator at its max_concurrent_rpcs refuses a streaming upload whose parts
# are still being sent. A device's calls are idempotent (an upload by its upload_id), so INTERNAL is asked again
# this many times before it counts as a refusal.
INTERNAL_RETRIES = 3


def retryable(code: grpc.StatusCode, internal_so_far: int) -> bool:
    """Whether a call that failed with ``code`` is asked again; ``internal_so_far``: its INTERNAL answers so far,
    this one included."""
    return code in RETRYABLE or (code == grpc.StatusCode.INTERNAL and internal_so_far <= INTERNAL_RETRIES)


@dataclass(frozen=True)
class Transport:
    """The agent's side of the wire.

    ``token``: the job's enrolment token (``edgeft server token create``), sent as ``authorization: Bearer``.
    TLS unless ``insecure``: ``ca_cert`` is the CA that signed the coordinator's certificate (None: the
    system's trust store), ``client_cert``/``client_key`` this device's certificate for a coordinator that
    requires mutual TLS, ``server_name`` the name to expect in the coordinator's certificate when the address
    does not carry it (e.g. connecting by IP address).
    """

    token: str
    insecure: bool = False
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # Keepalive while the device trains (minutes without a call): a ping every 60 s keeps NAT and firewall
    # idle timers (often 2-5 minutes) from dropping the connection during a 15-minute local round, and a
    # ping unanswered for 20 s marks the connection dead so the next call reconnects instead of hanging to
    # its deadline. The coordinator accepts pings down to every 30 s on idle connections (ServerLimits), so
    # this never earns a GOAWAY "too_many_pings".
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        token = (self.token or "").strip()
        if not token or any(c.isspace() for c in token):
            raise ConfigError("no enrolment token: pass --token-file FILE or set EDGEFT_TOKEN (the coordinator's "
                              "operator makes one with `edgeft server token create --job JOB`)")
        object.__setattr__(self, "token", token)
        for name in ("ca_cert", "client_cert", "client_key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
                if self.insecure:
                    raise ConfigError(f"--insecure (plaintext) cannot be combined with a TLS file ({name}={value})")
                if not Path(value).is_file():
                    raise ConfigError(f"invalid {name}={str(value)!r}: no such file")
        if (self.client_cert is None) != (self.client_key is None):
            raise ConfigError("give both --client-cert and --client-key (mutual TLS), or neither")
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ConfigError(f"invalid max_message_bytes={self.max_message_bytes}: must be >= {MIN_MESSAGE_BYTES}")
        if self.keepalive_time_s <= 0 or self.keepalive_timeout_s <= 0:
            raise ConfigError("keepalive_time_s and keepalive_timeout_s must be positive")


def read_token(path: str | Path | None, environ: dict | None = None) -> str:
    """The enrolment token from a file (first line), else from $EDGEFT_TOKEN; "" when neither is there."""
    import os

    if path is not None:
        try:
            text = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from exc
        return text.splitlines()[0].strip() if text else ""
    return (environ if environ is not None else os.environ).get(TOKEN_ENV, "").strip()


def channel_options(transport: Transport) -> list[tuple[str, int | str]]:
    """gRPC channel arguments: message limits, keepalive (see Transport), the expected server name."""
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", transport.max_message_bytes),
        ("grpc.max_send_message_length", transport.max_message_bytes),
        ("grpc.keepalive_time_ms", int(transport.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(transport.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),  # ping while no call is in flight: that is training time
        ("grpc.http2.max_pings_without_data", 0),  # the default (2) stops pinging after two pings without data
    ]
    if transport.server_name:
        options.append(("grpc.ssl_target_name_override", transport.server_name))
    return options


def channel_target(address: str) -> tuple[str, list[tuple[str, str]], str | None]:
    """(gRPC target, extra channel arguments, the host a TLS certificate must name) for ``--server``.

    One ``HOST:PORT``: that address, as before. Several, comma-separated (coordinator replicas): each host resolved
    to its addresses, and gRPC's round-robin policy spreads calls over those that answer and moves on from one that
    fails. A ``dns:///NAME:PORT`` target (one name with several records) also gets round robin. The certificate
    name is the first host's (``--server-name`` overrides it), so replicas share a certificate naming it."""
    parts = [p.strip() for p in address.split(",") if p.strip()]
    if address.startswith("dns:"):
        return address, [("grpc.lb_policy_name", "round_robin")], None
    if len(parts) < 2:
        return address, [], None
    resolved: list[str] = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        host = host.strip("[]")
        if not sep or not port.isdigit() or not host:
            raise ConfigError(f"invalid --server entry {part!r}: expected HOST:PORT")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConfigError(f"cannot resolve the coordinator host {host!r} in --server: {exc.strerror}") from exc
        for info in infos:
            ip = info[4][0]
            entry = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            if entry not in resolved:
                resolved.append(entry)
    families = {"ipv6" if entry.startswith("[") else "ipv4" for entry in resolved}
    family = "ipv4" if "ipv4" in families else "ipv6"  # gRPC's static target holds one family
    target = f"{family}:" + ",".join(e for e in resolved if (e.startswith("[")) == (family == "ipv6"))
    first = parts[0].rpartition(":")[0].strip("[]")
    return target, [("grpc.lb_policy_name", "round_robin")], None if _is_ip(first) else first


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def open_channel(address: str, transport: Transport) -> grpc.Channel:
    """A channel to the coordinator at ``address`` (one ``HOST:PORT`` or several replicas, ``channel_target``) that
    sends the enrolment token with every call."""
    target, extra, name = channel_target(address)
    options = channel_options(transport) + extra
    if name and not transport.server_name:
        options.append(("grpc.ssl_target_name_override", name))
    if transport.insecure:
        log.warning("PLAINTEXT (--insecure): the enrolment token and this device's model updates travel to %s "
                    "unencrypted and unauthenticated; use this on a trusted development network only.", address)
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, _credentials(transport), options=options)
    return grpc.intercept_channel(channel, BearerToken(transport.token))


def open_aio_channel(address: str, transport: Transport) -> grpc.aio.Channel:
    """``open_channel`` for asyncio (many simulated devices in one process, ``edgeft.testing.lightweight``): the same
    target, channel arguments, credentials and token on every call. Each such channel has its own connection: gRPC
    otherwise shares one between channels of the same target and arguments (its global subchannel pool), and a
    fleet's channels all went over one connection, whose frames the coordinator takes in one at a time."""
    target, extra, name = channel_target(address)
    options = channel_options(transport) + extra + [("grpc.use_local_subchannel_pool", 1)]
    if name and not transport.server_name:
        options.append(("grpc.ssl_target_name_override", name))
    interceptors = [AioBearerToken(transport.token), AioStreamBearerToken(transport.token)]
    if transport.insecure:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, _credentials(transport), options=options, interceptors=interceptors)


def _credentials(transport: Transport) -> grpc.ChannelCredentials:
    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(root_certificates=read(transport.ca_cert),
                                        private_key=read(transport.client_key),
                                        certificate_chain=read(transport.client_cert))


def connection_hint(details: str, transport: Transport) -> tuple[str, bool] | None:
    """What to do about a connection that failed during set-up, and whether retrying is pointless (a TLS
    handshake the device itself refused); None when the failure says nothing about TLS."""
    text = details or ""
    if "WRONG_VERSION_NUMBER" in text:
        return ("the coordinator does not speak TLS (it runs with insecure = true); for a development "
                "coordinator like that, pass --insecure", True)
    if "Hostname Verification" in text or "No match found for server name" in text:
        return ("the coordinator's certificate does not name the host in --server; connect by a name in its "
                "certificate, or pass --server-name NAME", True)
    if "handshake failed" in text.lower() or "CERTIFICATE_VERIFY_FAILED" in text:
        return ("the TLS handshake failed: the coordinator's certificate is not signed by a CA this device trusts; "
                "pass --ca-cert with the CA that signed it (`edgeft certs` writes ca.pem)", True)
    if "Socket closed" in text:
        if transport.insecure:
            return ("the coordinator closed the plaintext connection: it probably serves TLS; drop --insecure and "
                    "pass --ca-cert", False)
        return ("the coordinator closed the connection during the TLS handshake: it probably requires a client "
                "certificate (mutual TLS); pass --client-cert and --client-key signed by the CA it trusts "
                "(its [server.tls] client_ca)", False)
    return None


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to the metadata of every call."""

    def __init__(self, token: str):
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self._entry],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request_iterator)


def _aio_details(details: grpc.aio.ClientCallDetails, entry: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), entry)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


class AioBearerToken(grpc.aio.UnaryUnaryClientInterceptor):
    """``BearerToken`` for asyncio channels' unary calls."""

    def __init__(self, token: str):
        self._entry = ("authorization", f"Bearer {token}")

    async def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return await continuation(_aio_details(details, self._entry), request)


class AioStreamBearerToken(grpc.aio.StreamUnaryClientInterceptor):
    """``BearerToken`` for asyncio channels' client-streaming calls (uploads)."""

    def __init__(self, token: str):
        self._entry = ("authorization", f"Bearer {token}")

    async def intercept_stream_unary(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return await continuation(_aio_details(details, self._entry), request_iterator)
