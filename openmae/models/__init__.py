"""Model families; importing this module registers every variant.

Code above the models imports the registry's functions from here, so the registry is always full.
"""

from openmae.models import classifier, convmae, convvit, mae, swin  # noqa: F401  (registers the variants)
from openmae.models.classifier import VisionTransformer
from openmae.models.convmae import ConvMAE
from openmae.models.convvit import ConvViT
from openmae.models.mae import MAEObjective, MAEOutput, MaskedAutoencoder
from openmae.models.swin import SimMIMSwin, SwinClassifier
from openmae.models.vit import ViTEncoder
from openmae.registry import arch_of, create_model, list_models, model_factory, register_model, register_variant

__all__ = [
    "ConvMAE",
    "ConvViT",
    "MAEObjective",
    "MAEOutput",
    "MaskedAutoencoder",
    "SimMIMSwin",
    "SwinClassifier",
    "ViTEncoder",
    "VisionTransformer",
    "arch_of",
    "create_model",
    "list_models",
    "model_factory",
    "register_model",
    "register_variant",
]
