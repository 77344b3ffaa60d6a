"""unCLIP: CLIP, a diffusion or AR prior from text to CLIP image embedding, and a diffusion decoder."""
