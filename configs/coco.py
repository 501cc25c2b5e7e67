"""SigLIP on COCO captions (2017 folders: train2017/, val2017/, annotations/captions_*2017.json), evaluated by
image<->text retrieval.

    python train.py --config configs/coco.py --workdir /tmp/coco                       # ../shared/data/coco
    python train.py --config 'configs/coco.py:path=/data/coco' --workdir /tmp/coco
    python train.py --config 'configs/coco.py:path=/data/coco,karpathy=/data/dataset_coco.json' --workdir W

Without a Karpathy split file it trains on train2017 and evaluates on val2017 (5,000 images). With one
(Karpathy's dataset_coco.json), it trains on his train + restval (113,287 images) and evaluates the
standard 5k-test protocol: 5,000 test images, their 25,010 captions, Recall@1/5/10 both ways. The file's
2014 names are found in the 2017 folders by COCO id. Add `,size=small` for the CPU-sized towers of
configs/flickr8k.py (a pipeline check; no SentencePiece vocabulary needed).
"""
import os

from siglip_jax.config import default_config, eval_config, source_config

SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
ARGUMENTS = ("path", "karpathy", "size")


def _arguments(arg: str | None) -> dict[str, str]:
    values = {"path": os.path.normpath(os.path.join(SHARED_DATA, "coco")), "karpathy": "", "size": "B/16"}
    for item in filter(None, (arg or "").split(",")):
        key, equals, value = item.partition("=")
        if not equals or key not in ARGUMENTS:
            raise ValueError(f"Unknown coco recipe argument {item!r}; give key=value pairs with keys "
                             f"{', '.join(ARGUMENTS)}, e.g. 'configs/coco.py:path=/data/coco'.")
        values[key] = value
    return values


def get_config(arg: str | None = None):
    values = _arguments(arg)
    config = default_config()
    path, karpathy = values["path"], values["karpathy"]
    if karpathy:
        config.data.train = source_config("karpathy_split", image_dir=path, karpathy_json=karpathy, split="train")
        config.evals.coco = eval_config(
            "retrieval", source_config("karpathy_split", image_dir=path, karpathy_json=karpathy, split="test"))
    else:
        config.data.train = source_config("coco2017", path=path, split="train")
        config.evals.coco = eval_config("retrieval", source_config("coco2017", path=path, split="val"))
    config.data.random_crop_scale = (0.6, 1.0)
    config.data.lowercase = True
    config.model.text.vocab_size = 259  # bytes; a SentencePiece vocabulary: --config.data.tokenizer_path
    config.model.text.max_len = 64
    if values["size"] == "small":
        config.total_steps = 1_000
        config.eval_every_steps = 500
        config.model.image.variant = "mu/8"
        config.model.image.image_size = 64
        for tower in (config.model.image, config.model.text):
            tower.width, tower.depth, tower.mlp_dim, tower.num_heads = 128, 4, 512, 4
        config.model.bias_init = -5.0  # about -log(batch 128), see configs/flickr8k.py
        config.optim.warmup_steps = 50
        config.data.batch_size = 128
        config.data.eval_batch_size = 200
    elif "/" in values["size"]:
        config.total_steps = 20_000
        config.eval_every_steps = 2_000
        config.model.image.variant = values["size"]
        config.model.text.variant = values["size"].split("/")[0]
        config.model.dtype = "bfloat16"
        config.optim.learning_rate = 3e-4
        config.optim.warmup_steps = 1_000
        config.data.batch_size = 1_024
        config.data.eval_batch_size = 512
        config.data.num_workers = 8
    else:
        raise ValueError(f"Unknown coco recipe size {values['size']!r}; use 'small' or a variant such as 'B/16'.")
    config.optim.weight_decay = 1e-4  # big_vision's convention (SigLIP's wd)
    return config
