"""edgeft: fine-tune models on the devices that hold the data.

The base package is the device side and never imports torch; ``edgeft.export`` (coordinator side) does.
"""

__version__ = "0.1.0"

from edgeft.errors import EdgeftError  # noqa: E402

__all__ = ["EdgeftError", "__version__"]
