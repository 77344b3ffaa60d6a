"""Image tokenizers: VQ-VAE / VQGAN models that turn images into codebook index grids and back."""

from tokenizers_img.autoencoder import Decoder, Encoder
from tokenizers_img.quantizers import FSQuantizer, Quantizer, QuantizerOutput, VectorQuantizer
from tokenizers_img.vq_model import VQConfig, VQModel, VQOutput

__all__ = [
    "Decoder",
    "Encoder",
    "FSQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "VQConfig",
    "VQModel",
    "VQOutput",
    "VectorQuantizer",
]
