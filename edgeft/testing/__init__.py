"""TEST TOOLING, apart from the product's runtime paths (the coordinator and the device agent never import it):
a federated fleet on one machine (``edgeft simulate``: a real coordinator, real agent processes, reports), its
agent processes (``agents``), Byzantine clients (``byzantine``), device heterogeneity (``fleet_profile``: speed,
availability, dropouts), lightweight model-less devices by the thousand for load figures (``lightweight``) and the
stand-ins that keep torch out of the simulated devices (``no_torch/``)."""

from edgeft.testing.runner import SimulationConfig, run_simulation

__all__ = ["SimulationConfig", "run_simulation"]
