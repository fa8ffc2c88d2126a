"""Stands in for peft in simulated device processes: edgeft.testing.agents puts this folder first on their
PYTHONPATH, where it shadows an installed peft. A device has none, so importing it fails as it would there."""

raise ModuleNotFoundError("No module named 'peft' (a simulated device: edgeft/testing/no_torch stands in for it)",
                          name="peft")
