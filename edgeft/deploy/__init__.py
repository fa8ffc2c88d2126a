"""Deployment: merge trained adapters into the base model, export an inference ONNX model, quantise it,
and measure it (coordinator side; needs the ``export`` extra). ``edgeft.predict`` runs the result.

``deploy`` rebuilds a Hugging Face model from its folder; ``deploy_module`` takes the torch module a bundle was
exported from with ``edgeft.export.export_module`` (image, feature, array or text inputs). ``trained_model`` gives
the trained model back as a torch module computing what the bundle's eval graph computes."""

from edgeft.deploy.package import DeployConfig, deploy, deploy_module
from edgeft.deploy.torch_model import TrainedModel, trained_model

__all__ = ["DeployConfig", "TrainedModel", "deploy", "deploy_module", "trained_model"]
