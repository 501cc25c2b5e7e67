"""SigLIP 2's training recipe, as far as it is built: the sigmoid loss plus LocCa's caption decoder on the
image tower's patch tokens (model.decoder, weight 1, half of the examples decoded in parallel), for the whole
run. Self-distillation (SILC) and masked prediction (TIPS) from 80% of training on are not built yet
(issue 30); docs/siglip2_recipe.md says what is in and what is left out.

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


def get_config(arg: str | None = None):
    variant = arg or "B/16"
    if variant == "cpu":
        return add_decoder(demo.get_config(), "demo")
    if variant != "B/16":
        raise ValueError(f"Unknown siglip2_recipe argument {variant!r}; use 'B/16' (the default) or 'cpu'.")
    # configs/siglip2_naflex.py's B/16 + B text, Gemma vocabulary, data and schedule, with the fixed-resolution
    # ViT at 224 px: the decoder reads a ViT's patch tokens (not yet NaFlex's padded ones).
    config = siglip2_naflex.get_config()
    config.model.image.kind = "vit"
    config.model.image.image_size = 224
    add_decoder(config, "flickr8k")
    config.model.decoder.logits_chunk = 16
    return config
