"""Image tokenizers: VQ-VAE / VQGAN models that turn images into codebook index grids and back."""
