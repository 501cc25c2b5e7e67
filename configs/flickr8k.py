"""SigLIP on Flickr8k (6,000 training images, 5 captions each), evaluated on its 1,000-image test split
(image<->text retrieval, 5 captions per image) and zero-shot CIFAR-10.

    python train.py --config configs/flickr8k.py --workdir /tmp/flickr8k          # small, 2 CPU cores
    python train.py --config configs/flickr8k.py:B/16 --workdir /tmp/flickr8k_b16 # B/16 at 224 px, accelerators

The first run trains the recipe's 2,000-piece SentencePiece vocabulary on the training captions, lowercased
(~30 s), and caches it at ~/.cache/siglip_jax/flickr8k_sp2000_lower.model (data.tokenizer_vocab_size); the same
file by hand: python -m tools.train_tokenizer --source flickr8k --path ../shared/data/flickr8k --arg split=train
--vocab_size 2000 --lowercase --output ~/.cache/siglip_jax/flickr8k_sp2000_lower.model.
Another vocabulary file: --config.data.tokenizer_path=FILE (trained with --lowercase, 2,000 pieces or
fewer). What each choice of the small recipe did is measured in docs/flickr8k.md.

Data is read in place from ../shared/data beside the repository; point elsewhere with
--config.data.train.args.path=/data/flickr8k (and the evals' source args likewise).

From WebDataset shards instead (the path for data in a bucket, or larger than a disk): write them once in
img2dataset's layout, then give their pattern after the variant (local, gs:// or s3://):

    python -m tools.convert --source flickr8k --path ../shared/data/flickr8k --arg split=train \
        --format webdataset --name "" --shard_size_mb 64 --output_dir /data/flickr8k_wds
    python train.py --config 'configs/flickr8k.py:small,shards=/data/flickr8k_wds/{00000..00004}.tar' --workdir W

(convert prints the pattern.) Training then streams the shards (webdataset_stream: per-host shards,
a shuffle buffer over open shards, reshuffled each epoch); the evals read the original files.
"""
import os

from siglip_jax.config import default_config, eval_config, source_config

SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


TOKENIZER_VOCAB = 2000


def default_tokenizer_path() -> str:
    """Where the recipe's SentencePiece vocabulary is cached (trained by the first run, see the docstring)."""
    return os.path.join(os.path.expanduser("~"), ".cache", "siglip_jax", f"flickr8k_sp{TOKENIZER_VOCAB}_lower.model")


def get_config(arg: str | None = None):
    variant, _, shards = (arg or "small").partition(",shards=")
    config = default_config()
    flickr = os.path.normpath(os.path.join(SHARED_DATA, "flickr8k"))
    cifar = os.path.normpath(os.path.join(SHARED_DATA, "cifar10", "test"))
    config.data.train = source_config("flickr8k", path=flickr, split="train")
    config.data.random_crop_scale = (0.6, 1.0)  # 6,000 images: mild crops against overfitting
    config.data.lowercase = True
    config.evals.flickr8k = eval_config("retrieval", source_config("flickr8k", path=flickr, split="test"))
    # Validation loss on the dev split (1,000 held-out images), at the training batch size.
    config.evals.flickr8k_dev = eval_config("contrastive_loss", source_config("flickr8k", path=flickr, split="dev"))
    config.evals.cifar10 = eval_config("classification", source_config("image_folder", path=cifar))
    # A SentencePiece vocabulary trained on the 30,000 training captions, lowercased (see the docstring).
    config.data.tokenizer = "sentencepiece"
    config.data.tokenizer_path = default_tokenizer_path()
    config.data.tokenizer_vocab_size = TOKENIZER_VOCAB  # trained on first use when the file is not there
    config.model.text.vocab_size = TOKENIZER_VOCAB
    config.model.text.max_len = 32  # 99% of captions fit in 29 pieces

    if variant == "small":  # 64 px, width 128, depth 4: see docs/flickr8k.md for what each choice did
        # 1,900 steps: test R@10 15.9 / 15.3% in 25.3 minutes of steps (27.1 minutes the whole command) on the quiet
        # 2-core machine with one CPU device per core (mesh.cpu_devices_per_core below), 2026-12-07; earlier runs
        # 15.3 / 15.2% and 16.3 / 15.1% (docs/flickr8k.md).
        config.total_steps = 1_900
        config.log_every_steps = 25
        config.eval_every_steps = 500
        config.checkpoint_every_steps = 500
        config.model.image.variant = "mu/8"
        config.model.image.image_size = 64
        # Mean of the patch tokens instead of SigLIP's MAP head: +2.5 / +1.7 points of test R@10 at step 1,000
        # (docs/flickr8k.md). The one cost: HF's SiglipVisionModel has only the MAP head, so this model exports
        # as params or stablehlo, not hf.
        config.model.image.pooling = "gap"
        for tower in (config.model.image, config.model.text):
            tower.width, tower.depth, tower.mlp_dim, tower.num_heads = 128, 4, 512, 4
        config.optim.learning_rate = 1e-3
        config.optim.warmup_steps = 100
        # optax convention: x lr 1e-3, so 1e-3 a step at the peak (10x SigLIP's): the dev loss keeps falling
        # instead of rising after step 500 (docs/flickr8k.md).
        config.optim.weight_decay = 1.0
        config.optim.weight_decay_convention = "optax"
        config.optim.ema_decay = 0.998  # evaluated beside the raw weights ("(EMA)" lines, ema/... metrics)
        config.data.batch_size = 128
        config.mesh.cpu_devices_per_core = True  # one CPU device per core: a faster step for this small model
        config.data.eval_batch_size = 200
        config.evals.cifar10.source.args.max_per_class = 100
        # SigLIP's b = -10 suits 32k batches; at 128, Adam moves b by about lr a step, so from -10 the model
        # spends thousands of steps raising it. -log(128) ~ -5 starts where the positives and the 127
        # negatives of a row weigh about the same.
        config.model.bias_init = -5.0
        config.data.random_flip = True
        # The 6,000 decoded photos (128 px in ../shared/data: ~300 MB) stay in memory after the first epoch: the
        # input pipeline's CPU per batch falls from ~0.15 to ~0.0X core-seconds, taken from the step on 2 cores.
        config.data.cache_decoded_mb = 512
    elif "/" in variant:  # a named ViT size for the image tower, the same size for text
        config.total_steps = 5_000
        config.log_every_steps = 50
        config.eval_every_steps = 1_000
        config.model.image.variant = variant
        config.model.text.variant = variant.split("/")[0]
        config.model.dtype = "bfloat16"
        config.optim.learning_rate = 3e-4
        config.optim.warmup_steps = 500
        config.optim.weight_decay = 0.1  # optax convention: x lr 3e-4
        config.optim.weight_decay_convention = "optax"
        config.data.batch_size = 512
        config.data.eval_batch_size = 512
        config.data.num_workers = 8
    else:
        raise ValueError(f"Unknown flickr8k recipe argument {variant!r}; use 'small' or a variant such as 'B/16'.")
    if shards:  # streamed shards written by tools/convert.py (see the module docstring)
        config.data.train = source_config("webdataset_stream", shards=shards, shuffle_buffer=2_000, open_shards=4)
        config.data.cache_decoded_mb = 0  # a stream reads each record once an epoch, in shard order
    return config
