"""``edgeft client`` (also ``python -m edgeft.client``): run a device agent. Never imports torch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from edgeft.commands.common import execute
from edgeft.errors import EdgeftError
from edgeft.wire.types import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from edgeft.client.agent import AgentConfig, Conditions, Tamper

HELP = "run a device agent: train each round on local data (no torch)"


def add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help=HELP)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The agent's flags (``edgeft client``, ``python -m edgeft.client``, and test tooling's agents)."""
    p.add_argument("--server", required=True, help="coordinator address HOST:PORT; replicas: HOST:PORT,HOST:PORT,... or "
                                                    "dns:///NAME:PORT (calls spread over them, and move on from one "
                                                    "that fails)")
    p.add_argument("--data", required=True, help="the device's data: .csv, .jsonl or .txt (text); an image folder "
                                                 "or table (image jobs); a table or .npz (feature and array jobs)")
    p.add_argument("--text-column", help="override the job's text column")
    p.add_argument("--label-column", help="override the job's label column")
    p.add_argument("--format", choices=["csv", "jsonl", "text"], help="override the file format")
    p.add_argument("--image-column", help="override the job's image-path column (image jobs)")
    p.add_argument("--feature-columns", help="override the job's feature columns, comma-separated or 'all'")
    p.add_argument("--cache-dir", default=".edgeft-device", help="bundle cache and device id (default .edgeft-device)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--give-up-after", type=float, default=600.0,
                   help="seconds the coordinator may stay unreachable before the agent stops (default 600)")
    p.add_argument("--max-lora-rank", type=int,
                   help="train at most this LoRA rank (a device with little memory): the coordinator serves the "
                        "largest rank of the job up to it ([job] device_ranks); default: the job's rank")
    p.add_argument("--provider", help="execution provider to train on: cpu, cuda, coreml, qnn, openvino, ... "
                                      "(default cpu); portable bundles train on any provider the runtime offers")
    p.add_argument("--training-slots", metavar="DIR:K",
                   help="share this machine with other agents: at most K of the agents given DIR train at once")
    p.add_argument("--token-file", help="file holding the job's enrolment token (default: $EDGEFT_TOKEN)")
    p.add_argument("--ca-cert", help="CA certificate that signed the coordinator's (default: the system's CAs)")
    p.add_argument("--client-cert", help="this device's certificate, for a coordinator that requires mutual TLS")
    p.add_argument("--client-key", help="the key of --client-cert")
    p.add_argument("--server-name", help="name to expect in the coordinator's certificate (default: the host in "
                                         "--server)")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext, no TLS (only against a development coordinator with insecure = true)")
    p.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES,
                   help="largest message to accept or send (default 8 MiB)")


def _training_slots(value: str | None) -> tuple[Path, int] | None:
    if not value:
        return None
    folder, _, count = value.rpartition(":")
    if not folder or not count.isdigit() or int(count) < 1:
        raise EdgeftError(f"invalid --training-slots {value!r}: expected DIR:K with K >= 1, e.g. /tmp/slots:2")
    return Path(folder), int(count)


def agent_config(args: argparse.Namespace) -> AgentConfig:
    """The agent's configuration from its flags."""
    from edgeft.client.agent import AgentConfig
    from edgeft.client.transport import Transport, read_token

    if not Path(args.data).exists():
        raise EdgeftError(f"data file {args.data} does not exist (a data file, or an image folder for image jobs)")
    transport = Transport(token=read_token(args.token_file), insecure=args.insecure, ca_cert=args.ca_cert,
                          client_cert=args.client_cert, client_key=args.client_key, server_name=args.server_name,
                          max_message_bytes=args.max_message_bytes)
    return AgentConfig(server=args.server, data=Path(args.data), cache_dir=Path(args.cache_dir),
                       text_column=args.text_column, label_column=args.label_column, format=args.format,
                       image_column=args.image_column, feature_columns=tuple(
                           c.strip() for c in args.feature_columns.split(",") if c.strip()) if args.feature_columns
                       else None,
                       threads=args.threads, give_up_after_s=args.give_up_after, max_lora_rank=args.max_lora_rank,
                       provider=args.provider, training_slots=_training_slots(args.training_slots),
                       transport=transport)


def run(args: argparse.Namespace, tamper: Tamper | None = None, conditions: Conditions | None = None) -> int:
    """Run the agent until its job is over (``tamper``, ``conditions``: test tooling's hooks, see ``Agent``)."""
    from edgeft.train.session import keep_torch_out

    keep_torch_out()
    import logging

    from edgeft.client.agent import Agent

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    agent = Agent(agent_config(args), tamper=tamper, conditions=conditions)
    print(f"done: {agent.run()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m edgeft.client [flags]``: the same as ``edgeft client [flags]``."""
    parser = argparse.ArgumentParser(prog="python -m edgeft.client", description=f"edgeft client: {HELP}")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return execute("client", lambda: run(args))
