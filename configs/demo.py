"""A small SigLIP on the generated shapes data: trains on a laptop CPU in a few minutes.

    python train.py --config configs/demo.py --workdir /tmp/demo
    python train.py --config configs/demo.py:naflex --workdir /tmp/demo_naflex

`naflex`: the pictures come at two aspect ratios (2:1 and 1:2, about 32 x 32 pixels each) and the image
tower is SigLIP 2's NaFlex (4 px patches, a budget of 64, each picture's aspect ratio kept).
"""
from siglip_jax.config import default_config, eval_config, source_config

IMAGE_SIZE = 32


NAFLEX_ASPECT_RATIOS = (2.0, 0.5)  # width / height of the pictures, in turn


def get_config(arg: str | None = None):
    if arg not in (None, "", "naflex"):
        raise ValueError(f"configs/demo.py takes no argument or 'naflex', got {arg!r}; use --config=configs/demo.py "
                         "(or :naflex) and --config.<key>=value overrides.")
    config = default_config()
    config.total_steps = 600
    config.log_every_steps = 25
    config.eval_every_steps = 200  # held-out retrieval at steps 200, 400 and the end

    config.model.image.variant = "mu/4"  # 32 px images in 4 px patches: 64 tokens
    config.model.image.image_size = IMAGE_SIZE
    config.model.image.width = 96
    config.model.image.depth = 3
    config.model.image.mlp_dim = 384
    config.model.image.num_heads = 4
    config.model.text.variant = "mu"
    config.model.text.width = 96
    config.model.text.depth = 2
    config.model.text.mlp_dim = 384
    config.model.text.num_heads = 4
    config.model.text.vocab_size = 259  # the byte tokenizer's
    config.model.text.max_len = 48  # the longest demo caption is 46 bytes, + EOS

    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 50
    # The recipe the README's demo table was measured with: 1e-4 multiplied by the learning rate.
    config.optim.weight_decay_convention = "optax"

    config.data.train = source_config("demo", split="train", size=50_000, image_size=IMAGE_SIZE)
    config.data.batch_size = 128
    config.mesh.cpu_devices_per_core = True  # one CPU device per core: a faster step for this small model
    config.data.eval_batch_size = 128
    # 512 held-out images with 5 captions each: chance Recall@5 is about 1% (image->text) and 1% (text->image).
    config.evals.demo = eval_config("retrieval", source_config("demo", split="eval", size=512, image_size=IMAGE_SIZE))
    if arg == "naflex":
        config.model.image.kind = "naflex"
        config.model.image.patch_size = 4
        config.model.image.max_num_patches = 64  # the square recipe's 8 x 8 tokens; posemb grid 8 x 8
        config.model.image.pooling = "map"
        for source in (config.data.train, config.evals.demo.source):
            source.args.aspect_ratios = NAFLEX_ASPECT_RATIOS
    return config
