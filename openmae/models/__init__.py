"""Model families; importing this module registers every variant."""

from openmae.models import mae  # noqa: F401
from openmae.models import convmae  # noqa: F401
from openmae.models import classifier  # noqa: F401
from openmae.models.classifier import VisionTransformer
from openmae.models.convmae import ConvMAE, ConvViT
from openmae.models.mae import MAEObjective, MAEOutput, MaskedAutoencoder
from openmae.models.vit import ViTEncoder

__all__ = ["ConvMAE", "ConvViT", "MAEObjective", "MAEOutput", "MaskedAutoencoder", "ViTEncoder", "VisionTransformer"]
