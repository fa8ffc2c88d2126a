"""A federated fleet on one machine (``edgeft simulate``): real coordinator, real agent processes, reports."""

from edgeft.simulation.runner import SimulationConfig, run_simulation

__all__ = ["SimulationConfig", "run_simulation"]
