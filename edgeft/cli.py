"""The ``edgeft`` command line: each sub-command parses its flags into a config and calls one function."""

from __future__ import annotations

import argparse
import sys

from edgeft.commands import client, coordinator, fleet, model
from edgeft.commands.common import execute

# The sub-commands, in the order `edgeft --help` lists them; each adds its parser (edgeft.commands).
COMMANDS = (model.add_export, model.add_train, fleet.add_demo, coordinator.add_server, client.add_client,
            coordinator.add_certs, fleet.add_simulate, model.add_deploy, model.add_predict,
            model.add_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return execute(args.command, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
