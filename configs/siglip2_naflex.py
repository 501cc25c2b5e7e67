"""SigLIP 2 NaFlex B/16 (SigLIP 2's released `siglip2-base-patch16-naflex` shape): each image keeps its
aspect ratio, resized so its 16 px patch grid fills a budget of 256 patches and padded to it; the 16 x 16
position-embedding grid is resized to each image's grid. Text: the B transformer, 64 tokens. For
accelerators; trains on Flickr8k (../shared/data) and evaluates retrieval there.

    python train.py --config configs/siglip2_naflex.py --workdir /tmp/siglip2_naflex

SigLIP 2 uses the Gemma SentencePiece vocabulary (256k); give yours with
--config.data.tokenizer=sentencepiece --config.data.tokenizer_path=/path/tokenizer.model (the 256k x 768
text embedding is split over the tensor and fsdp mesh axes). Fine-tune a released checkpoint with
--config.init_from=/path/to/siglip2-base-patch16-naflex (an HF Siglip2Model directory).
"""
import os

from siglip_jax.config import default_config, eval_config, source_config

SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
GEMMA_VOCAB = 256_000


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/siglip2_naflex.py takes no argument, got {arg!r}.")
    config = default_config()
    config.model.image.kind = "naflex"
    config.model.image.variant = "B/16"
    config.model.image.max_num_patches = 256  # posemb grid 16 x 16
    config.model.text.variant = "B"
    config.model.text.max_len = 64
    config.model.text.vocab_size = GEMMA_VOCAB  # fits any tokenizer up to the Gemma vocabulary
    config.model.dtype = "bfloat16"

    flickr = os.path.normpath(os.path.join(SHARED_DATA, "flickr8k"))
    config.data.train = source_config("flickr8k", path=flickr, split="train")
    config.evals.flickr8k = eval_config("retrieval", source_config("flickr8k", path=flickr, split="test"))
    config.data.lowercase = True
    config.data.batch_size = 512
    config.data.eval_batch_size = 512
    config.data.num_workers = 8

    config.total_steps = 5_000
    config.log_every_steps = 50
    config.eval_every_steps = 1_000
    config.optim.learning_rate = 3e-4
    config.optim.warmup_steps = 500
    config.optim.weight_decay = 0.1  # optax convention: x lr 3e-4
    config.optim.weight_decay_convention = "optax"
    return config
