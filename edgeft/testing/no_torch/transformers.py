"""Stands in for transformers in simulated device processes: edgeft.testing.agents puts this folder first on their
PYTHONPATH, where it shadows an installed transformers. A device has none, so importing it fails as it would there."""

raise ModuleNotFoundError("No module named 'transformers' (a simulated device: edgeft/testing/no_torch stands in "
                          "for it)", name="transformers")
