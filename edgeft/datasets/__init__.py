"""Small real data sets that ship with edgeft, so the demo and the tests need no download.

BANKING77 (Casanueva et al., 2020, CC BY 4.0): see ``banking77/SOURCE.md`` for origin and attribution.
Tiny Shakespeare (Karpathy, char-rnn; public-domain text): see ``tinyshakespeare/SOURCE.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeft.data import DataConfig

BANKING77_DIR = Path(__file__).parent / "banking77"
TINYSHAKESPEARE = Path(__file__).parent / "tinyshakespeare" / "input.txt"


def banking77_labels() -> list[str]:
    """The 77 BANKING77 intent labels, in label-id order."""
    import json

    return json.loads((BANKING77_DIR / "categories.json").read_text())


def banking77(split: str) -> DataConfig:
    """The shipped BANKING77 ``train`` or ``test`` split as a DataConfig (columns text and category)."""
    from edgeft.data import DataConfig

    return DataConfig(BANKING77_DIR / f"{split}.csv", text_column="text", label_column="category")
