"""Deployment: merge trained adapters into the base model, export an inference ONNX model, quantise it,
and measure it (coordinator side; needs the ``export`` extra). ``edgeft.predict`` runs the result.

``deploy`` rebuilds a Hugging Face model from its folder; ``deploy_module`` takes the torch module a bundle was
exported from with ``edgeft.export.export_module`` (image, feature, array or text inputs)."""

from edgeft.deploy.package import DeployConfig, deploy, deploy_module

__all__ = ["DeployConfig", "deploy", "deploy_module"]
