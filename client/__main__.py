"""``python -m edgeft.client [flags]``: the device agent, the same as ``edgeft client [flags]``."""

import sys

from edgeft.commands.client import main

if __name__ == "__main__":
    sys.exit(main())
