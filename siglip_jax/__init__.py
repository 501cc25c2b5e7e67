"""siglip_jax: contrastive image-text pretraining (SigLIP / CLIP) in JAX."""
