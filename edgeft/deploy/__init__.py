"""Deployment: merge trained adapters into the base model, export an inference ONNX model, quantise it,
and measure it (coordinator side; needs the ``export`` extra). ``edgeft.predict`` runs the result."""

from edgeft.deploy.package import DeployConfig, deploy

__all__ = ["DeployConfig", "deploy"]
