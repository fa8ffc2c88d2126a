"""``edgeft server`` (the coordinator), ``edgeft server token ...`` (device enrolment tokens) and ``edgeft certs``
(a development CA and TLS certificates)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeft.errors import EdgeftError


def add_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="run the federated coordinator (gRPC) for the jobs in a TOML file; "
                                      "`edgeft server token ...` manages device enrolment tokens")
    p.add_argument("--config", help="TOML file with [server] and [[job]] tables (see README)")
    p.add_argument("--address", help="listen address, overrides the file (e.g. 0.0.0.0:50051)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="serve plaintext instead of TLS (development on a trusted network only; logged loudly)")
    p.set_defaults(func=_run_server)
    tokens = p.add_subparsers(dest="server_command", metavar="token").add_parser(
        "token", help="device enrolment tokens: create, list, revoke").add_subparsers(dest="token_command",
                                                                                     required=True)
    create = tokens.add_parser("create", help="make a token for a job and print it (once; only its hash is kept)")
    create.add_argument("--config", required=True, help="the coordinator's TOML file")
    create.add_argument("--job", required=True, help="the job the token enrols devices in")
    create.add_argument("--expires-in", help="lifetime, e.g. 30d, 12h, 90m or seconds (default: until revoked)")
    create.add_argument("--note", default="", help="a note kept with the token (e.g. who it is for)")
    create.set_defaults(func=_run_token_create)
    listing = tokens.add_parser("list", help="show the tokens (ids, jobs, status; never the tokens)")
    listing.add_argument("--config", required=True, help="the coordinator's TOML file")
    listing.add_argument("--job", help="only this job's tokens")
    listing.set_defaults(func=_run_token_list)
    revoke = tokens.add_parser("revoke", help="revoke tokens by id: calls made with them are refused at once")
    revoke.add_argument("--config", required=True, help="the coordinator's TOML file")
    revoke.add_argument("ids", nargs="+", metavar="ID", help="token ids (`edgeft server token list`)")
    revoke.set_defaults(func=_run_token_revoke)


def _run_server(args: argparse.Namespace) -> int:
    import logging

    from edgeft.server.config import load_server_config
    from edgeft.server.servicer import serve

    if not args.config:
        raise EdgeftError("give --config jobs.toml")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(load_server_config(args.config, address=args.address, insecure=args.insecure))
    return 0


def _token_store(config_path: str):  # noqa: ANN202
    from edgeft.server.auth import TokenStore
    from edgeft.server.config import load_server_config
    from edgeft.server.store import open_database

    config = load_server_config(config_path)
    return TokenStore(open_database(config.database_url), [job.id for job in config.jobs])


def _when(seconds: float | None) -> str:
    import time

    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def _run_token_create(args: argparse.Namespace) -> int:
    from edgeft.server.auth import parse_duration

    store = _token_store(args.config)
    expires = parse_duration(args.expires_in) if args.expires_in else None
    info, token = store.create(args.job, expires, args.note)
    print(f"token {info.id} for job {info.job_id}, expires {_when(info.expires_at)} UTC; it is shown only now "
          "(the coordinator keeps its hash). Give it to devices as --token-file FILE or EDGEFT_TOKEN.",
          file=sys.stderr)
    print(token)
    return 0


def _run_token_list(args: argparse.Namespace) -> int:
    rows = _token_store(args.config).list(args.job)
    print(f"{'id':<17} {'job':<20} {'status':<8} {'created (UTC)':<20} {'expires (UTC)':<20} note")
    for t in rows:
        print(f"{t.id:<17} {t.job_id:<20} {t.status():<8} {_when(t.created_at):<20} {_when(t.expires_at):<20} {t.note}")
    return 0


def _run_token_revoke(args: argparse.Namespace) -> int:
    store = _token_store(args.config)
    for token_id in args.ids:
        info = store.revoke(token_id)
        print(f"token {info.id} (job {info.job_id}) revoked at {_when(info.revoked_at)} UTC")
    return 0


def add_certs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="make a development CA and TLS certificates for a coordinator and devices "
                                     "(local use, not production)")
    p.add_argument("--out", default="certs", help="folder to write (default certs); a CA already there is reused")
    p.add_argument("--host", action="append", dest="hosts",
                   help="a name or IP address of the coordinator, repeatable (default: localhost, 127.0.0.1, ::1)")
    p.add_argument("--client", action="append", dest="clients",
                   help="a device certificate to make (NAME.pem, NAME.key), repeatable (default: device)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.set_defaults(func=_run_certs)


def _run_certs(args: argparse.Namespace) -> int:
    try:
        from edgeft.server.certs import CertsConfig, make_certs
        import cryptography  # noqa: F401
    except ImportError as exc:
        raise EdgeftError("edgeft certs needs the `cryptography` package: pip install 'edgeft[server]'") from exc
    config = CertsConfig(out=Path(args.out), clients=tuple(args.clients or ("device",)), days=args.days,
                         **({"hosts": tuple(args.hosts)} if args.hosts else {}))
    files = make_certs(config)
    print(f"wrote a development CA and certificates to {config.out} (hosts: {', '.join(config.hosts)}):")
    for role, path in files.items():
        print(f"  {role:<16} {path}")
    client = config.clients[0]
    files = {role: path.resolve() for role, path in files.items()}
    print(f"""
coordinator (jobs.toml):
  [server.tls]
  cert = "{files['server']}"
  key = "{files['server_key']}"
  client_ca = "{files['ca']}"     # optional: mutual TLS
device:
  edgeft client --server {config.hosts[0]}:50051 --ca-cert {files['ca']}"""
          + f" --client-cert {files[client]} --client-key {files[client + '_key']}"
          + " --token-file TOKEN_FILE ...")
    return 0
