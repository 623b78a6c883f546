"""Model families; importing this module registers every variant."""

from openmae.models import mae  # noqa: F401
from openmae.models import convmae  # noqa: F401
from openmae.models import classifier  # noqa: F401
from openmae.models.classifier import VisionTransformer
from openmae.models.mae import MAEOutput, MaskedAutoencoder
from openmae.models.vit import ViTEncoder

__all__ = ["MAEOutput", "MaskedAutoencoder", "ViTEncoder", "VisionTransformer"]
