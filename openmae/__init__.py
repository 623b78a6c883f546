"""openmae: self-supervised pretraining of vision models with masked autoencoders.

The public API: build models (``create_model``, ``list_models``, ``register_model``) and move
weights in and out (``load_pretrained``, ``save_pretrained``, ``export_pretrained``,
``inspect_checkpoint``). Training runs live in :mod:`openmae.commands` (``run_pretrain``, ...).
"""

from openmae.interop import create_model, export_pretrained, inspect_checkpoint, load_pretrained, save_pretrained
from openmae.io import openmae_version
from openmae.models import list_models, register_model

__version__ = openmae_version()

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
