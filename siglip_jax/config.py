"""The configuration schema: every key, its default and what it means, and validation with errors
that name the bad key and the valid ones. Recipes in configs/ start from `default_config()`."""
from __future__ import annotations

import difflib
import json
import logging
import math
from typing import Any

import ml_collections

LOSS_NAMES = ("sigmoid", "softmax")
LOSS_IMPLEMENTATIONS = ("all_gather", "ring", "chunked")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "rsqrt", "linear", "constant")
WEIGHT_DECAY_CONVENTIONS = ("big_vision", "optax")
MESH_AXES = ("data", "fsdp", "tensor")
# Which weights of a training checkpoint to load (eval.py/export.py --weights, loading.load_model):
# "raw" the trained parameters, "ema" their exponential moving average (optim.ema_decay > 0).
WEIGHTS = ("raw", "ema")

# Logical axis name -> mesh axes. Parameters: "embed" is sharded over fsdp (ZeRO-3 style), MLP width,
# heads and vocabulary over tensor. Activations: the batch over every data-parallel axis.
DEFAULT_AXIS_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("embed_out", None),
    ("length", None),
    ("layers", None),  # the stacked-blocks axis of scan_layers
    ("norm", None),
)


def _tower(kind: str, variant: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            kind=kind,  # an entry of models.two_towers.IMAGE_TOWERS / TEXT_TOWERS
            variant=variant,  # size by name, e.g. "B/16" (see models/sizes.py)
            width=0,  # 0: from the variant; otherwise overrides it
            depth=0,
            mlp_dim=0,
            num_heads=0,
        )
    )


def source_config(kind: str, **args: Any) -> ml_collections.ConfigDict:
    """A data source by kind ("demo" or a kind of data/sources) with that kind's own arguments, which
    the source checks by its signature (so `args` is free-form here)."""
    return ml_collections.ConfigDict(dict(kind=kind, args=ml_collections.ConfigDict(args)))


def eval_config(kind: str, source: ml_collections.ConfigDict, **options: Any) -> ml_collections.ConfigDict:
    """One entry of `config.evals`: kind "retrieval", "classification", "contrastive_loss", "fewshot" or
    "caption_loss" over a source."""
    entry = ml_collections.ConfigDict(dict(EVAL_DEFAULTS))
    entry.kind = kind
    entry.source = source
    for key, value in options.items():
        if key not in EVAL_DEFAULTS:
            raise ValueError(f"Unknown eval option {key!r}; valid: {', '.join(EVAL_DEFAULTS)}.")
        entry[key] = value
    return entry


EVAL_KINDS = ("retrieval", "classification", "contrastive_loss", "fewshot", "caption_loss")
EVAL_DEFAULTS = dict(
    # "retrieval" (image<->text Recall@K), "classification" (zero-shot) or "contrastive_loss" (the
    # training loss on held-out pairs at data.batch_size: validation loss, to see overfitting) or "fewshot"
    # (a ridge-regression linear probe on frozen image embeddings, as big_vision's fewshot_lsr) or
    # "caption_loss" (the caption decoder's token cross-entropy on held-out pairs, teacher-forced and parallel)
    kind="retrieval",
    source=None,  # source_config(...) of the eval data
    templates="imagenet",  # classification prompts: "imagenet" (CLIP's 80) or a file, one "{}" template a line
    class_names="",  # classification: a file of class names, one a line; "": the source's own names
    max_items=0,  # evaluate only the first N records; 0: all
    shots=10,  # fewshot: train images per class, drawn at random (seeded by config.seed) from `source`
    l2_reg=2.0 ** 10,  # fewshot: the ridge penalty on whitened embeddings (big_vision's default)
    test_source=None,  # fewshot: source_config(...) of the labelled test split; None: `source`'s other images
)


def default_config() -> ml_collections.ConfigDict:
    """Every key with its default. The returned config is locked: unknown keys are refused."""
    image = _tower("vit", "B/16")
    image.patch_size = 0  # 0: from the variant ("B/16" -> 16)
    image.image_size = 224  # square input resolution in pixels
    image.pooling = "map"  # "map" (SigLIP), "gap" or "tok"
    image.max_num_patches = 256  # kind "naflex": patch budget per image (aspect ratio kept, padded to it)
    image.posemb_grid = 0  # kind "naflex": side of the stored square posemb grid; 0: sqrt(max_num_patches)
    text = _tower("transformer", "B")
    text.vocab_size = 32_000
    text.max_len = 64  # tokens per caption, EOS included
    # SigLIP 2's LocCa captioning task (models/decoder.py): a decoder reading the image tower's patch tokens
    # predicts the caption (tokenized as for the text tower); its loss is added to the contrastive one.
    decoder = ml_collections.ConfigDict(dict(
        weight=0.0,  # > 0: the decoder is built and its caption loss added times this (SigLIP 2: 1.0); 0: none
        width=0,  # 0: the text tower's width
        depth=0,  # 0: half the text tower's depth, at least 1
        mlp_dim=0,  # 0: the text tower's
        num_heads=0,  # 0: the text tower's
        parallel_prob=0.5,  # share of examples predicted in parallel (inputs all masked, no causal mask); SigLIP 2: 0.5
        logits_chunk=0,  # caption positions whose vocabulary logits are computed at once (a divisor of max_len); 0: all
    ))

    # SigLIP 2's self-supervised image losses, from distill.start_fraction of training on: SILC's self-distillation
    # (the student's local crops predict an EMA teacher's global view through a projection head) and TIPS's masked
    # patch prediction (the student's masked patches predict the teacher's per-patch outputs); losses/distillation.py.
    distill = ml_collections.ConfigDict(dict(
        weight=0.0,  # SILC loss weight (SigLIP 2: 1.0 x the size factor 0.25 / 0.5 / 1.0 / 0.5 for B / L / So400m / g); 0: off
        masked_weight=0.0,  # TIPS loss weight (SigLIP 2: 0.25 x the same factor); 0: off
        start_fraction=0.8,  # both join at this fraction of total_steps (SigLIP 2: 0.8)
        n_local=8,  # local crops per example, the student's views (SigLIP 2: 8, beside the teacher's 1 global view)
        local_image_size=0,  # pixels per side of a local crop (a multiple of the patch size); 0: half image_size
        local_crop_scale=(0.05, 0.4),  # area fraction of the image each local crop covers
        mask_ratio=0.5,  # share of the student's patches replaced by the learned mask token (SigLIP 2: 0.5)
        prototypes=4096,  # the projection head's outputs (DINO: 65,536)
        head_bottleneck=256,  # the projection head's L2-normalised bottleneck width
        student_temperature=0.1,
        teacher_temperature=0.04,  # sharper than the student's
        center_momentum=0.9,  # of the running centre subtracted from the teacher's logits
        teacher_decay=0.996,  # the teacher is this EMA of the student's image tower and head
    ))

    config = ml_collections.ConfigDict(
        dict(
            seed=0,  # parameters, data order and dropout all derive from it
            accum_steps=1,  # >1: the global batch in this many microbatches, loss still exact (GradCache)
            total_steps=10_000,
            log_every_steps=50,
            eval_every_steps=1_000,  # evals below run every N steps and at the end; 0: only at the end
            checkpoint_every_steps=1_000,  # save every N steps, at the end and on SIGTERM; 0: only the latter two
            keep_checkpoints=3,  # keep the latest N checkpoints...
            keep_every_steps=0,  # ...and also every one at a multiple of N steps, for good; 0: none
            init_from="",  # start from the parameters of this workdir or checkpoint (fresh optimizer and step)
            init_towers=(),  # with init_from: the parameter groups to copy, e.g. ("img",); (): all
            init_skip=(),  # with init_from: regexes of parameter paths keeping their fresh init, e.g. ("img/MAPHead_0/.*",)
            max_nonfinite_steps=5,  # stop after this many steps in a row with a NaN/Inf loss, gradient or update
            # warn (log and "loss_over_start" metric) when the loss exceeds this many times the run's first
            # logged loss: a healthy run's loss only falls, a diverging one climbs while staying finite; 0: off
            loss_rise_factor=4.0,
            log_batch_checksums=False,  # log a CRC32 of each logged step's batch, to check resumed runs see the same data
            evals={},  # name -> eval_config(...); free-form names, each entry checked by validate()
            tensorboard=True,  # TensorBoard event files beside metrics.jsonl (written without TensorFlow)
            profile_steps=(0, 0),  # [first, last) steps traced by jax.profiler into workdir/profile; (0, 0): off
            peak_tflops_per_device=0.0,  # for MFU; 0: the table in metrics.py by device kind
            model=dict(
                image=image,
                text=text,
                decoder=decoder,
                distill=distill,
                embed_dim=0,  # 0: the image width, and no image head (SigLIP); else both towers project to it
                dtype="float32",  # compute dtype: "bfloat16" on accelerators; parameters stay float32
                remat_policy="none",  # "none", "full" or "dots_saveable"
                scan_layers=False,  # nn.scan over blocks: compile time independent of depth; stacked params
                scan_unroll=1,  # with scan_layers: blocks per loop iteration; the depth unrolls (the fastest CPU start, docs/speed.md)
                attention="auto",  # "auto" (cuDNN fused attention on GPU where it applies, else XLA), "xla", "cudnn"
                temperature_init=10.0,  # t = log(temperature_init)
                bias_init=-10.0,
            ),
            loss=dict(
                name="sigmoid",  # "sigmoid" (SigLIP) or "softmax" (CLIP)
                implementation="all_gather",  # "all_gather", "ring" or "chunked", see losses/contrastive.py
                chunk_size=0,  # keys scored at once: needed by "chunked", optional for "ring"
                max_temperature=0.0,  # clamp exp(t) at this in the loss (open_clip's softmax: 100); 0: off
            ),
            optim=dict(
                name="adamw",  # "adamw" or "sgd"
                learning_rate=1e-3,  # peak, after warmup
                schedule="cosine",  # "cosine", "rsqrt", "linear" or "constant" after warmup
                warmup_steps=1_000,
                end_learning_rate_fraction=0.0,  # cosine/linear end value as a fraction of the peak
                # Decoupled, on kernels only (see wd_mults), in `weight_decay_convention`: SigLIP's 1e-4 is
                # big_vision's `wd` (= 0.1 in optax's convention at lr 1e-3).
                weight_decay=1e-4,
                weight_decay_convention="big_vision",  # "big_vision": -(lr(step)/peak) wd p; "optax": -lr(step) wd p
                b1=0.9,
                b2=0.95,
                eps=1e-8,
                grad_clip_norm=1.0,  # global-norm clipping; 0 turns it off
                mu_dtype="float32",  # first-moment dtype: "bfloat16" halves its memory
                frozen=(),  # parameter groups left untrained, e.g. ("img",) for LiT
                freeze=(),  # regexes over parameter paths ("img/Transformer/encoderblock_0/...") left untrained
                lr_mults=(),  # ((regex, multiplier), ...): the first full match scales that parameter's lr
                wd_mults=(),  # ((regex, multiplier), ...) as big_vision; (): 1 on every kernel, 0 elsewhere
                layer_decay=0.0,  # lr x decay^(depth - i) for block i, decay^(depth+1) for embeddings; 0: off
                # Keep an exponential moving average of the parameters (e.g. 0.9999), evaluated beside them
                # ("ema/..." metrics) and chosen by --weights ema; decay warmed up as min(d, (1+n)/(10+n)); 0: off
                ema_decay=0.0,
            ),
            mesh=dict(
                axis_names=MESH_AXES,
                shape=(-1, 1, 1),  # devices per axis; one -1 takes the remaining devices
                axis_rules=DEFAULT_AXIS_RULES,
                # On a CPU machine, train.py makes one CPU device per core and trains data-parallel over them
                # (runtime.distributed.cpu_devices_per_core). Faster for small models (configs/flickr8k.py's
                # step 0.78-0.94x, the demo's 0.91x), slower for larger ones (S/16 at batch 32: 1.04-1.09x; each
                # device repeats the optimizer update), so recipes opt in. --local_device_count wins.
                cpu_devices_per_core=False,
            ),
            data=dict(
                train=source_config("demo", split="train"),
                batch_size=256,  # global batch, across all devices and processes
                eval_batch_size=256,
                tokenizer="byte",  # "byte", "sentencepiece" or "hf"
                tokenizer_path="",  # the .model or tokenizer.json file for the latter two
                # sentencepiece: > 0 trains a vocabulary of this many pieces on data.train's captions (lowercased
                # with data.lowercase) when tokenizer_path does not exist yet, and caches it there; 0: must exist
                tokenizer_vocab_size=0,
                lowercase=False,
                num_workers=0,  # grain worker processes; 0 reads in the main process
                prefetch_batches=2,
                random_crop_scale=(1.0, 1.0),  # random-resized-crop area range in training; (1, 1): none
                random_flip=False,
                # Keep up to this many MB of decoded training images in memory (per process and worker): small
                # sets read for many epochs skip the file read and JPEG decode after the first (random-access
                # sources only; sources/decoded_cache.py). 0: off
                cache_decoded_mb=0,
            ),
        )
    )
    config.lock()
    # Free-form groups: recipes add their own names and source arguments.
    config.evals.unlock()
    config.data.train.args.unlock()
    return config


FREE_FORM_KEYS = ("args", "evals")  # checked elsewhere: source arguments by the source, evals below


def _unknown_key(full: str, valid: Any) -> ValueError:
    key = full.rsplit(".", 1)[-1]
    nearest = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.6)
    near = f" Did you mean {' or '.join(repr(full[: len(full) - len(key)] + name) for name in nearest)}?" if nearest else ""
    return ValueError(
        f"Unknown config key {full!r}.{near} Valid keys at this level: {', '.join(sorted(valid))}. "
        "Fix the key's spelling (recipe or --config.<key>=value)."
    )


def check_override_keys(names: list[str]) -> None:
    """Refuses dotted override names (`optim.learning_rate` from `--config.optim.learning_rate=...`) that
    are not keys of the schema, as validate() would, before config_flags applies them."""
    for name in names:
        node: Any = default_config()
        parts = name.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part in FREE_FORM_KEYS:
                break  # past a leaf (config_flags reports it) or into free-form keys (checked by their owner)
            if part not in node:
                raise _unknown_key(".".join(parts[: depth + 1]), node.keys())
            node = node[part]


def _check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, path: str) -> None:
    for key in config.keys():
        full = f"{path}{key}"
        if key in FREE_FORM_KEYS:
            continue
        if key not in reference:
            raise _unknown_key(full, reference.keys())
        value, expected = config[key], reference[key]
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise TypeError(f"Config key {full!r} must be a group of keys, got {value!r}.")
            _check_keys(value, expected, full + ".")
        elif not _same_kind(value, expected):
            raise TypeError(
                f"Config key {full!r} must be of type {type(expected).__name__} (like its default "
                f"{expected!r}), got {type(value).__name__} {value!r}."
            )


def _same_kind(value: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float))
    if isinstance(expected, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(expected))


def _check_choice(value: str, valid: tuple[str, ...], key: str) -> None:
    if value not in valid:
        raise ValueError(f"Config key {key!r} is {value!r}; valid values: {', '.join(valid)}.")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Refuses unknown keys, wrong types and out-of-range choices; returns the config."""
    _check_keys(config, default_config(), "")
    for name, entry in config.evals.items():
        reference = {**EVAL_DEFAULTS, "source": source_config("demo")}
        if entry.get("test_source") is not None:
            reference["test_source"] = source_config("demo")
        _check_keys(entry, ml_collections.ConfigDict(reference), f"evals.{name}.")
        _check_choice(entry.kind, EVAL_KINDS, f"evals.{name}.kind")
    _check_choice(config.loss.name, LOSS_NAMES, "loss.name")
    _check_choice(config.loss.implementation, LOSS_IMPLEMENTATIONS, "loss.implementation")
    _check_choice(config.optim.name, OPTIMIZERS, "optim.name")
    _check_choice(config.optim.schedule, SCHEDULES, "optim.schedule")
    _check_choice(config.optim.weight_decay_convention, WEIGHT_DECAY_CONVENTIONS, "optim.weight_decay_convention")
    if config.data.tokenizer_vocab_size and config.data.tokenizer_vocab_size != config.model.text.vocab_size:
        raise ValueError(f"data.tokenizer_vocab_size={config.data.tokenizer_vocab_size} (the vocabulary trained on first "
                         f"use) differs from model.text.vocab_size={config.model.text.vocab_size}; set both to the "
                         "same number.")
    for key in ("learning_rate", "weight_decay", "grad_clip_norm"):
        value = float(config.optim[key])
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"optim.{key} must be a finite number >= 0, got {config.optim[key]!r}"
                             + ("; a negative learning rate climbs the loss instead of descending it."
                                if key == "learning_rate" else "; 0 turns it off."))
    if config.model.scan_unroll < 1:
        raise ValueError(f"model.scan_unroll must be >= 1 (blocks per scan iteration; the depth or more unrolls the "
                         f"scan), got {config.model.scan_unroll}.")
    _check_decoder(config)
    _check_distill(config)
    if not 0.0 <= config.optim.ema_decay < 1.0:
        raise ValueError(f"optim.ema_decay must be in [0, 1) (0 turns the EMA off; e.g. 0.9999), got {config.optim.ema_decay}.")
    if not set(config.mesh.axis_names) <= set(MESH_AXES):
        raise ValueError(f"mesh.axis_names {config.mesh.axis_names} must be drawn from {MESH_AXES}.")
    if len(config.mesh.shape) != len(config.mesh.axis_names):
        raise ValueError(
            f"mesh.shape {tuple(config.mesh.shape)} has {len(config.mesh.shape)} entries but mesh.axis_names "
            f"{tuple(config.mesh.axis_names)} has {len(config.mesh.axis_names)}; give one size per axis."
        )
    for key in ("checkpoint_every_steps", "keep_every_steps", "data.cache_decoded_mb"):
        if config[key] < 0:
            raise ValueError(f"Config key {key!r} must be >= 0 (0 turns it off), got {config[key]}.")
    if config.keep_checkpoints < 1:
        raise ValueError(
            f"Config key 'keep_checkpoints' must be >= 1 (resuming needs the latest), got {config.keep_checkpoints}."
        )
    for key in ("total_steps", "data.batch_size", "data.eval_batch_size", "log_every_steps"):
        value = config[key.split(".")[0]] if "." not in key else config.data[key.split(".")[1]]
        if value <= 0:
            raise ValueError(f"Config key {key!r} must be positive, got {value}.")
    return config


MIN_CAPTION_TOKENS = {"byte": 32}  # a caption the decoder can learn from: 32 bytes, or 8 word pieces
MIN_CAPTION_PIECES = 8


def _check_decoder(config: ml_collections.ConfigDict) -> None:
    decoder = config.model.decoder
    if not (math.isfinite(decoder.weight) and decoder.weight >= 0):
        raise ValueError(f"model.decoder.weight must be a finite number >= 0 (0: no decoder; SigLIP 2: 1.0), "
                         f"got {decoder.weight!r}.")
    if not 0.0 <= decoder.parallel_prob <= 1.0:
        raise ValueError(f"model.decoder.parallel_prob must be in [0, 1] (SigLIP 2: 0.5), got {decoder.parallel_prob}.")
    for key in ("width", "depth", "mlp_dim", "num_heads", "logits_chunk"):
        if decoder[key] < 0:
            raise ValueError(f"model.decoder.{key} must be >= 0 (0: the default), got {decoder[key]}.")
    if decoder.logits_chunk and config.model.text.max_len % decoder.logits_chunk:
        raise ValueError(f"model.decoder.logits_chunk={decoder.logits_chunk} does not divide model.text.max_len="
                         f"{config.model.text.max_len}; pick a divisor (or 0: no chunking).")
    if not decoder.weight:
        return
    minimum = MIN_CAPTION_TOKENS.get(config.data.tokenizer, MIN_CAPTION_PIECES)
    if config.model.text.max_len < minimum:
        raise ValueError(
            f"model.decoder.weight={decoder.weight} trains a caption decoder, but model.text.max_len="
            f"{config.model.text.max_len} {config.data.tokenizer} tokens is too short for a caption (at least "
            f"{minimum}); raise model.text.max_len, use a word-piece tokenizer (data.tokenizer='sentencepiece'), "
            "or set model.decoder.weight=0.")
    if config.model.image.kind != "vit":
        raise ValueError(f"model.decoder needs model.image.kind='vit' (got {config.model.image.kind!r}): the decoder "
                         "does not read NaFlex's padded patches yet; set model.decoder.weight=0.")
    if config.accum_steps > 1:
        raise ValueError(f"model.decoder with accum_steps={config.accum_steps}: gradient accumulation splits only "
                         "the contrastive loss; set accum_steps=1 (and a smaller data.batch_size) or "
                         "model.decoder.weight=0.")


def local_image_size(model_config: ml_collections.ConfigDict) -> int:
    """The side of a distillation local crop: model.distill.local_image_size, or half the image size."""
    return model_config.distill.local_image_size or model_config.image.image_size // 2


def _check_distill(config: ml_collections.ConfigDict) -> None:
    distill = config.model.distill
    for key in ("weight", "masked_weight"):
        if not (math.isfinite(distill[key]) and distill[key] >= 0):
            raise ValueError(f"model.distill.{key} must be a finite number >= 0 (0: off), got {distill[key]!r}.")
    if not 0.0 <= distill.start_fraction <= 1.0:
        raise ValueError(f"model.distill.start_fraction must be in [0, 1] (the share of total_steps before the "
                         f"distillation losses join; SigLIP 2: 0.8), got {distill.start_fraction}.")
    if not 0.0 <= distill.mask_ratio < 1.0:
        raise ValueError(f"model.distill.mask_ratio must be in [0, 1) (the share of patches masked; SigLIP 2: 0.5), "
                         f"got {distill.mask_ratio}.")
    low, high = distill.local_crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"model.distill.local_crop_scale must satisfy 0 < min <= max <= 1, got {tuple(distill.local_crop_scale)}; "
                         "e.g. (0.05, 0.4).")
    for key in ("student_temperature", "teacher_temperature"):
        if not distill[key] > 0:
            raise ValueError(f"model.distill.{key} must be > 0, got {distill[key]}.")
    for key in ("center_momentum", "teacher_decay"):
        if not 0.0 <= distill[key] < 1.0:
            raise ValueError(f"model.distill.{key} must be in [0, 1), got {distill[key]}.")
    for key in ("n_local", "local_image_size", "prototypes", "head_bottleneck"):
        if distill[key] < 0:
            raise ValueError(f"model.distill.{key} must be >= 0, got {distill[key]}.")
    if not (distill.weight or distill.masked_weight):
        return
    if config.model.image.kind != "vit":
        raise ValueError(f"model.distill needs model.image.kind='vit' (got {config.model.image.kind!r}): crops and masks "
                         "of NaFlex's padded patches are not built; set model.distill.weight=0 and masked_weight=0.")
    if config.accum_steps > 1:
        raise ValueError(f"model.distill with accum_steps={config.accum_steps}: gradient accumulation splits only the "
                         "contrastive loss; set accum_steps=1 or model.distill.weight=0 and masked_weight=0.")
    if distill.prototypes < 1 or distill.head_bottleneck < 1:
        raise ValueError(f"model.distill.prototypes ({distill.prototypes}) and head_bottleneck ({distill.head_bottleneck}) "
                         "must be positive when a distillation loss is on.")
    if distill.weight and distill.n_local < 1:
        raise ValueError(f"model.distill.weight={distill.weight} distils into local crops, but model.distill.n_local="
                         f"{distill.n_local}; give at least 1 (SigLIP 2: 8) or set model.distill.weight=0.")
    side, image_side = local_image_size(config.model), config.model.image.image_size
    if distill.weight and not 0 < side <= image_side:
        raise ValueError(f"model.distill.local_image_size={side} must be in (0, model.image.image_size={image_side}]: "
                         f"a local crop is a part of the image, seen smaller; e.g. --config.model.distill.local_image_size="
                         f"{image_side // 2}.")


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config's JSON data with the keys added since it was written (e.g. model.decoder) at their
    defaults, so a comparison with today's config sees only real changes. Free-form groups are left as saved."""
    def fill(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        filled = dict(values)
        for key, default in defaults.items():
            if key in FREE_FORM_KEYS:
                continue
            if key not in filled:
                filled[key] = default
            elif isinstance(default, dict) and isinstance(filled[key], dict):
                filled[key] = fill(filled[key], default)
        return filled

    return fill(saved, json.loads(default_config().to_json()))


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(item) for item in value) if isinstance(value, (list, tuple)) else value


# Keys that configs saved by earlier versions may hold -> what the key meant, for the one line a reader gets.
# Saved configs are read without them (a checkpoint's parameters do not depend on them); recipes that set
# one are refused like any unknown key.
RETIRED_KEYS = {
    "loss.bidirectional": "the bidirectional ring (removed 2026-12-06, issue 27: 1.9x the ring's memory and no "
                          "faster); `ring` now always sends one way and computes the same loss",
}


def _merge(target: ml_collections.ConfigDict, values: dict, path: str) -> None:
    for key, value in values.items():
        if path + key in RETIRED_KEYS:
            if value:
                logging.getLogger(__name__).warning("The saved config sets %s=%r, %s.", path + key, value,
                                                    RETIRED_KEYS[path + key])
            continue
        if key in FREE_FORM_KEYS:
            target[key] = ml_collections.ConfigDict(value)
        elif key not in target:
            raise ValueError(
                f"Unknown config key {path + key!r} in the saved config; valid keys at this level: "
                f"{', '.join(sorted(target.keys()))}. Was it written by a newer siglip_jax?"
            )
        elif isinstance(target[key], ml_collections.ConfigDict):
            _merge(target[key], value, f"{path}{key}.")
        elif isinstance(target[key], tuple):
            # JSON has no tuples; nested ones (mesh.axis_rules) come back as lists of lists.
            target[key] = _as_tuples(value)
        else:
            target[key] = value


def from_json(saved: str | dict[str, Any]) -> ml_collections.ConfigDict:
    """A full, validated config from JSON written by `config.to_json()` (checkpoints, exported params),
    as text or as the data it holds: the defaults overridden by its keys; unknown keys are refused."""
    config = default_config()
    values = json.loads(saved) if isinstance(saved, str) else saved
    with config.unlocked():
        if "weight_decay_convention" not in values.get("optim", {"weight_decay_convention": None}):
            # Written before the key existed, when decay was always multiplied by the learning rate.
            config.optim.weight_decay_convention = "optax"
        _merge(config, values, "")
    return validate(config)
