"""SigLIP 2's training recipe: the sigmoid loss plus LocCa's caption decoder on the image tower's patch tokens
(model.decoder, weight 1, half of the examples decoded in parallel) for the whole run, and from 80% of training
on self-distillation from an EMA teacher over 8 local crops (SILC) and masked patch prediction (TIPS)
(model.distill); docs/siglip2_recipe.md says what is in and what is left out.

    python train.py --config configs/siglip2_recipe.py --workdir W       # B/16 at 224 px, accelerators
    python train.py --config configs/siglip2_recipe.py:cpu --workdir W   # the demo's data and towers, 2 CPU cores

The B/16 variant trains on Flickr8k (../shared/data) like the other recipes; point data.train at your own
image-text data for real pretraining. SigLIP 2 uses the Gemma SentencePiece vocabulary (256k): give yours with
--config.data.tokenizer=sentencepiece --config.data.tokenizer_path=/path/tokenizer.model. The decoder's
vocabulary logits are computed 16 caption positions at a time (model.decoder.logits_chunk), so a 256k
vocabulary never holds [batch, 64, 256k] logits at once.
"""
from configs import demo, siglip2_naflex
from siglip_jax.config import eval_config


def add_decoder(config, held_out: str):
    """SigLIP 2's LocCa task (arXiv 2502.14786, section 2.1): decoder weight 1, parallel prediction for half
    of the examples, the decoder half as deep as the text tower (model.decoder's defaults); its held-out
    caption loss (teacher-forced and parallel) on the source of the retrieval eval `held_out`."""
    config.model.decoder.weight = 1.0
    config.model.decoder.parallel_prob = 0.5
    config.evals[f"{held_out}_captions"] = eval_config("caption_loss", config.evals[held_out].source)
    return config


# SigLIP 2's per-size factor of the two self-supervised losses' weights (section 2.2).
DISTILL_SIZE_FACTOR = {"B": 0.25, "L": 0.5, "So400m": 1.0, "g": 0.5}


def add_distillation(config, size: str):
    """SigLIP 2's SILC and TIPS (section 2.2): weights 1 and 0.25 times the size's factor, from 80% of training
    on, 1 global view for the teacher and 8 local crops for the student, half the patches masked."""
    factor = DISTILL_SIZE_FACTOR[size]
    config.model.distill.weight = 1.0 * factor
    config.model.distill.masked_weight = 0.25 * factor
    config.model.distill.start_fraction = 0.8
    config.model.distill.n_local = 8
    config.model.distill.mask_ratio = 0.5
    return config


def get_config(arg: str | None = None):
    variant = arg or "B/16"
    if variant == "cpu":
        config = add_distillation(add_decoder(demo.get_config(), "demo"), "B")  # the smallest size's factor
        # A head for 32 px pictures in 4 px patches (8 x 8 global, 4 x 4 local tokens): DINO's 65k prototypes
        # would cost more than the towers.
        config.model.distill.prototypes = 1024
        config.model.distill.head_bottleneck = 128
        return config
    if variant != "B/16":
        raise ValueError(f"Unknown siglip2_recipe argument {variant!r}; use 'B/16' (the default) or 'cpu'.")
    # configs/siglip2_naflex.py's B/16 + B text, Gemma vocabulary, data and schedule, with the fixed-resolution
    # ViT at 224 px: the decoder reads a ViT's patch tokens (not yet NaFlex's padded ones).
    config = siglip2_naflex.get_config()
    config.model.image.kind = "vit"
    config.model.image.image_size = 224
    add_decoder(config, "flickr8k")
    config.model.decoder.logits_chunk = 16
    add_distillation(config, "B")
    config.model.distill.local_image_size = 96  # 6 x 6 patches of 16 px, as DINO's 96 px local crops at 224
    config.model.distill.prototypes = 65_536  # DINO's
    return config
