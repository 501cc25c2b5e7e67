"""One SigLIP train step three ways, timed in interleaved rounds in one process:

  ours     this project's compiled train step (the trainer's own, through bench/common.py)
  floor    a hand-written JAX step of the same math on the same parameters: a plain jax.numpy forward
           pass built from the primitives ours lowers to (strided conv patches, jax.nn.dot_product_attention,
           one-pass LayerNorm statistics, jnp.take), the sigmoid loss, and our recipe's update in stock
           optax (global-norm clipping + AdamW, kernels decayed); no sharding annotations, no non-finite
           guard, no metrics: what our design could reach at best
  pytorch  HF transformers' SiglipModel (its own sigmoid loss, return_loss=True) + torch.optim.AdamW

    python bench/compare_step.py [--rounds 3] [--steps 3] [--batch 32] [--variant S/16] [--image-size 128]
                                 [--depth N]   (N blocks per tower instead of the variant's: quick runs)

Before timing, the floor is checked against ours: the embeddings of the same parameters must agree, and
so must the losses of the first two steps (the second follows one optimizer update), so the floor is the
same step and not a cheaper one. XLA's cost analysis of both compiled steps (FLOPs, bytes accessed) is
printed too: a deterministic profile beside the noisy times. Rounds rotate the order of the three.
Defaults are the shapes of issue 16: S/16 image and S text towers, 128 px, 32 tokens, vocabulary 32k,
batch 32, float32, constant learning rate 1e-3.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import common  # noqa: F401  (puts the repo on the path)

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
LAYER_NORM_EPSILON = 1e-6


# ------------------------------------------------------------------------------------- the floor
# The same math as our model in the fewest lines, with the primitives ours lowers to (a strided conv for
# the patches, jax.nn.dot_product_attention, flax's one-pass LayerNorm statistics, jnp.take for the
# token embedding), so a gap between the two is overhead of our design, not a different algorithm.

def _layer_norm(x, params):
    import jax
    import jax.numpy as jnp

    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.maximum(jnp.mean(jnp.square(x), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
    return (x - mean) * (jax.lax.rsqrt(variance + LAYER_NORM_EPSILON) * params["scale"]) + params["bias"]


def _attention(queries_from, keys_from, params):
    """[b, q, d], [b, k, d] -> [b, q, d]; parameters in flax's MultiHeadDotProductAttention layout."""
    import jax
    import jax.numpy as jnp

    def project(x, name):
        return jnp.einsum("bld,dnh->blnh", x, params[name]["kernel"]) + params[name]["bias"]

    query, key, value = project(queries_from, "query"), project(keys_from, "key"), project(keys_from, "value")
    attended = jax.nn.dot_product_attention(query, key, value)
    return jnp.einsum("blnh,nhd->bld", attended, params["out"]["kernel"]) + params["out"]["bias"]


def _mlp(x, params):
    import jax

    x = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    return jax.nn.gelu(x, approximate=True) @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


def _encoder(x, params):
    depth = sum(name.startswith("encoderblock_") for name in params)
    for index in range(depth):
        block = params[f"encoderblock_{index}"]
        y = _layer_norm(x, block["LayerNorm_0"])
        x = x + _attention(y, y, block["MultiHeadDotProductAttention_0"])
        x = x + _mlp(_layer_norm(x, block["LayerNorm_1"]), block["MlpBlock_0"])
    return _layer_norm(x, params["encoder_norm"])


def _normalize(x):
    import jax.numpy as jnp

    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def floor_embed(params: Any, images, tokens):
    """The SigLIP forward pass in plain jax.numpy on our parameter tree: (images [b, d], texts [b, d])."""
    import jax
    import jax.numpy as jnp

    image_params, text_params = params["img"], params["txt"]
    kernel = image_params["embedding"]["kernel"]  # [patch, patch, 3, width]
    patch = kernel.shape[0]
    x = images.astype(jnp.float32) / 127.5 - 1.0
    x = jax.lax.conv_general_dilated(x, kernel, (patch, patch), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    batch = x.shape[0]
    x = x.reshape(batch, -1, x.shape[-1]) + image_params["embedding"]["bias"] + image_params["pos_embedding"]
    x = _encoder(x, image_params["Transformer"])
    head = image_params["MAPHead_0"]
    probe = jnp.broadcast_to(head["probe"], (batch, 1, x.shape[-1]))
    pooled = _attention(probe, x, head["MultiHeadDotProductAttention_0"])
    pooled = pooled + _mlp(_layer_norm(pooled, head["LayerNorm_0"]), head["MlpBlock_0"])
    image_embeddings = _normalize(pooled[:, 0])

    y = jnp.take(text_params["Embed_0"]["embedding"], tokens, axis=0) + text_params["pos_embedding"]
    y = _encoder(y, text_params["Encoder_0"])
    text_embeddings = _normalize(y[:, -1] @ text_params["head"]["kernel"] + text_params["head"]["bias"])
    return image_embeddings, text_embeddings


def floor_optimizer(optim_config):
    """Our recipe's update in stock optax: global-norm clipping, then AdamW at a constant learning rate,
    decaying kernels only, with the decay in big_vision's convention (wd / peak, times the rate)."""
    import jax
    import optax

    def kernels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)

    return optax.chain(
        optax.clip_by_global_norm(optim_config.grad_clip_norm),
        optax.adamw(optim_config.learning_rate, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                    weight_decay=optim_config.weight_decay / optim_config.learning_rate, mask=kernels),
    )


def floor_step_fn(optim_config) -> tuple[Callable, Any]:
    """(jitted step(params, opt_state, images, tokens) -> (params, opt_state, loss), the optimizer)."""
    import jax
    import jax.numpy as jnp
    import optax

    optimizer = floor_optimizer(optim_config)

    def loss_fn(params, images, tokens):
        image_embeddings, text_embeddings = floor_embed(params, images, tokens)
        logits = image_embeddings @ text_embeddings.T * jnp.exp(params["t"]) + params["b"]
        labels = 2.0 * jnp.eye(logits.shape[0]) - 1.0
        return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]

    def step(params, opt_state, images, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), optimizer


# ---------------------------------------------------------------------------------------- pytorch

def pytorch_step_fn(args: argparse.Namespace, size: Any, patch: int) -> Callable[[], float]:
    import numpy as np
    import torch
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    shared = dict(hidden_size=size.width, intermediate_size=size.mlp_dim, num_hidden_layers=size.depth,
                  num_attention_heads=size.num_heads, layer_norm_eps=LAYER_NORM_EPSILON)
    model_config = SiglipConfig(
        vision_config=dict(image_size=args.image_size, patch_size=patch, **shared),
        text_config=dict(vocab_size=args.vocab, max_position_embeddings=args.tokens, **shared),
    )
    model = SiglipModel(model_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.uniform(-1, 1, (args.batch, 3, args.image_size, args.image_size)).astype(np.float32))
    tokens = torch.from_numpy(rng.integers(3, args.vocab, (args.batch, args.tokens)))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        optimizer.step()
        return float(loss)

    parameters = sum(p.numel() for p in model.parameters())
    return step, parameters


# ------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="S/16", help="image tower; the text tower is the same size")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation per round")
    parser.add_argument("--depth", type=int, default=0, help="blocks per tower (0: the variant's); for dry runs")
    args = parser.parse_args()

    import jax
    import numpy as np
    import torch

    from siglip_jax.config import default_config
    from siglip_jax.models import sizes

    config = default_config()
    config.model.image.variant = args.variant
    config.model.text.variant = args.variant.split("/")[0]
    config.model.image.image_size = args.image_size
    config.model.text.max_len = args.tokens
    config.model.text.vocab_size = args.vocab
    config.model.dtype = "float32"
    config.data.batch_size = args.batch
    config.model.image.depth = config.model.text.depth = args.depth
    # A constant learning rate, so the floor's stock optax chain is our update step for step.
    config.optim.learning_rate = LEARNING_RATE
    config.optim.schedule, config.optim.warmup_steps = "constant", 0
    size, patch = sizes.parse_variant(args.variant)
    if args.depth:
        size = sizes.TransformerSize(**{**size.__dict__, "depth": args.depth})

    # Ours: the trainer's step, compiled for one device.
    compiled, state, batch, _ = common.compiled_train_step(config)
    our_parameters = sum(leaf.size for leaf in jax.tree.leaves(state.params))

    # The floor, on a copy of our initial parameters; checked against our model before timing.
    floor_step, optimizer = floor_step_fn(config.optim)
    floor_params = jax.tree.map(lambda leaf: jax.device_put(np.asarray(leaf)), state.params)
    images, tokens = batch["images"], batch["tokens"]
    from siglip_jax.models import two_towers

    ours_images, ours_texts = two_towers.build_model(config.model).apply({"params": state.params}, images, tokens)
    floor_images, floor_texts = jax.jit(floor_embed)(floor_params, images, tokens)
    difference = max(float(np.max(np.abs(np.asarray(ours_images) - np.asarray(floor_images)))),
                     float(np.max(np.abs(np.asarray(ours_texts) - np.asarray(floor_texts)))))
    if difference > 1e-4:
        raise SystemExit(f"The floor's embeddings differ from our model's by {difference:.2e}: not the same model.")
    floor_state = [floor_params, optimizer.init(floor_params)]
    floor_compiled = floor_step.lower(*floor_state, images, tokens).compile()
    # XLA's own estimate of each compiled step's work: a deterministic profile, unlike times on a
    # shared machine. Bytes beyond the floor's are passes over memory that our design adds.
    for name, executable in (("ours", compiled), ("floor", floor_compiled)):
        cost = executable.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        print(f"{name}: XLA cost analysis {cost.get('flops', 0):.3e} FLOPs, "
              f"{cost.get('bytes accessed', 0):.3e} bytes accessed", flush=True)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pytorch_step, pytorch_parameters = pytorch_step_fn(args, size, patch)

    def run_ours() -> float:
        nonlocal state
        state, metrics = compiled(state, batch)
        return float(metrics["loss"])

    def run_floor() -> float:
        floor_state[0], floor_state[1], loss = floor_compiled(floor_state[0], floor_state[1], images, tokens)
        return float(loss)

    steps = {"ours": run_ours, "floor": run_floor, "pytorch": pytorch_step}
    # Warm up outside the timed rounds, two steps each. The second loss already follows one update, so
    # equal losses from ours and the floor show the same optimizer too, not only the same forward pass.
    losses = {name: [step(), step()] for name, step in steps.items()}
    loss_gap = max(abs(a - b) for a, b in zip(losses["ours"], losses["floor"]))
    if loss_gap > 1e-3 * max(1.0, abs(losses["ours"][0])):
        raise SystemExit(f"The floor's losses {losses['floor']} differ from ours {losses['ours']}: not the same step.")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.rounds):
        # Each round starts one implementation later, so none always runs right after the same other.
        names = list(steps)[round_index % len(steps):] + list(steps)[: round_index % len(steps)]
        for name in names:
            step = steps[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
        print(f"round {round_index + 1}: " + ", ".join(f"{name} {times[name][-1]:.3f} s" for name in steps), flush=True)

    medians = {name: statistics.median(values) for name, values in times.items()}
    device = jax.devices()[0]
    print(f"\n{args.variant} image + {args.variant.split('/')[0]} text, {args.image_size} px, {args.tokens} tokens, "
          f"vocab {args.vocab}, batch {args.batch}, float32 on {device.device_kind}; "
          f"parameters: ours {our_parameters:,}, pytorch {pytorch_parameters:,}; floor embeddings within "
          f"{difference:.1e}, first two losses within {loss_gap:.1e} (ours {losses['ours']}, pytorch "
          f"{losses['pytorch']}); load average (1, 5, 15 min) {os.getloadavg()} on {os.cpu_count()} CPUs")
    print("| step | median s/step | range | vs pytorch | vs floor |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, values in times.items():
        print(f"| {name} | {medians[name]:.3f} | {min(values):.3f}-{max(values):.3f} | "
              f"{medians[name] / medians['pytorch']:.2f}x | {medians[name] / medians['floor']:.2f}x |")
    # On a loaded machine the per-round ratios (neighbours in time) are steadier than ratios of medians.
    for other in ("floor", "pytorch"):
        ratios = [mine / theirs for mine, theirs in zip(times["ours"], times[other])]
        print(f"ours / {other} per round: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
