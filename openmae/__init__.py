"""openmae: self-supervised pretraining of vision models with masked autoencoders."""

__version__ = "0.1.0"

from openmae.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from openmae.interop import export_pretrained, inspect_checkpoint  # noqa: E402
from openmae.registry import create_model, list_models, register_model  # noqa: E402

__all__ = [
    "__version__",
    "create_model",
    "export_pretrained",
    "inspect_checkpoint",
    "list_models",
    "load_pretrained",
    "register_model",
    "save_pretrained",
]
