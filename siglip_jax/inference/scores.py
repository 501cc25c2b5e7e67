"""Match probabilities: how likely an image and a text belong together. The one scoring function of
the package (eval.py --pairs, inference, search), and it follows the loss the model was trained with:

  sigmoid (SigLIP): sigmoid(t * x.y + b) with t = exp(t'). The loss trains exactly this to be 1 for a
      matching pair and 0 otherwise (Zhai et al. 2023, eq. 1), so it is a calibrated per-pair
      probability, independent of the other items.
  softmax (CLIP): softmax over the candidates of t * x.y (no bias, as in the loss): the probability that
      this candidate, rather than another of those given, is the match. It depends on the candidate set;
      by default the candidates of an image are the texts (`over="texts"`), for a text query over a
      gallery pass `over="images"`. For pairs, the candidates of image i are all the given texts.

The functions are pure and jit-able; pass the embeddings the model returns (already L2-normalised by
the model), its learned log temperature t' and bias b, the loss it was trained with and the loss's
temperature clamp (loss.max_temperature: t is clamped as in training). Callers read loss and clamp from
the model's own saved config (loading.with_overrides keeps them), and say which score they print
(`describe`).
"""
import jax
import jax.numpy as jnp

from siglip_jax.config import LOSS_NAMES
from siglip_jax.losses.contrastive import clamp_log_temperature


def describe(loss: str, over: str = "texts") -> str:
    """One line naming what the probabilities of a model trained with `loss` are, for output headers."""
    if loss == "softmax":
        return (f"softmax over the {over} given of t*cos (softmax-trained model: no trained bias, so these "
                "are relative to the candidates, not per-pair probabilities)")
    return "sigmoid(t*cos + b) per pair (sigmoid-trained model: a calibrated per-pair probability)"


def _check_pair_inputs(image_embeddings, text_embeddings) -> None:
    if image_embeddings.ndim != 2 or text_embeddings.ndim != 2:
        raise ValueError(
            f"image_embeddings and text_embeddings must be 2-D [num_items, width]; got shapes "
            f"{image_embeddings.shape} and {text_embeddings.shape}. Add a leading axis for one item.")
    if image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(
            f"image_embeddings width {image_embeddings.shape[1]} != text_embeddings width "
            f"{text_embeddings.shape[1]}; both must come from the same two-tower model.")


def _probability(dots, log_temperature, bias, loss: str, axis: int, max_temperature: float):
    if loss not in LOSS_NAMES:
        raise ValueError(f"Unknown loss {loss!r} for match probabilities; valid: {', '.join(LOSS_NAMES)}.")
    temperature = jnp.exp(clamp_log_temperature(jnp.asarray(log_temperature, jnp.float32), max_temperature))
    if loss == "softmax":
        return jax.nn.softmax(temperature * dots, axis=axis)
    return jax.nn.sigmoid(temperature * dots + jnp.asarray(bias, jnp.float32))


def pair_probabilities(image_embeddings, text_embeddings, log_temperature, bias, loss: str = "sigmoid",
                       max_temperature: float = 0.0) -> jax.Array:
    """Probability that image i matches text i: sigmoid(exp(t') x_i . y_i + b), or for softmax the
    diagonal of `match_probabilities` (text i among all the texts given).

    Args:
      image_embeddings: [num_pairs, width].
      text_embeddings: [num_pairs, width], row i paired with image row i.
      log_temperature: scalar t' (the model stores the log so that t = exp(t') stays positive).
      bias: scalar b.
      loss: "sigmoid" or "softmax", the model's loss.name.
      max_temperature: the model's loss.max_temperature (0: no clamp).
    Returns:
      [num_pairs] float32 in (0, 1).
    """
    image_embeddings, text_embeddings = jnp.asarray(image_embeddings), jnp.asarray(text_embeddings)
    _check_pair_inputs(image_embeddings, text_embeddings)
    if image_embeddings.shape[0] != text_embeddings.shape[0]:
        raise ValueError(
            f"pair_probabilities scores row i against row i, so both need the same number of rows; got "
            f"{image_embeddings.shape[0]} images and {text_embeddings.shape[0]} texts. "
            "Use match_probabilities for every image against every text.")
    if loss == "softmax":
        return jnp.diagonal(match_probabilities(image_embeddings, text_embeddings, log_temperature, bias, loss,
                                                max_temperature=max_temperature))
    dots = jnp.einsum("nd,nd->n", image_embeddings, text_embeddings, preferred_element_type=jnp.float32)
    return _probability(dots, log_temperature, bias, loss, -1, max_temperature)


def match_probabilities(image_embeddings, text_embeddings, log_temperature, bias, loss: str = "sigmoid",
                        over: str = "texts", max_temperature: float = 0.0) -> jax.Array:
    """Every image against every text: [num_images, width] x [num_texts, width] -> [num_images, num_texts].
    `over` ("texts" or "images") names the candidates a softmax normalises over; sigmoid ignores it.

    Builds the full matrix, so it is for small sets (a demo, a re-ranking shortlist); use
    blockwise.top_k_search for galleries.
    """
    image_embeddings, text_embeddings = jnp.asarray(image_embeddings), jnp.asarray(text_embeddings)
    _check_pair_inputs(image_embeddings, text_embeddings)
    if over not in ("texts", "images"):
        raise ValueError(f"over={over!r}: the candidates are 'texts' (each image's) or 'images' (each text's).")
    dots = jnp.einsum("nd,md->nm", image_embeddings, text_embeddings, preferred_element_type=jnp.float32)
    return _probability(dots, log_temperature, bias, loss, -1 if over == "texts" else 0, max_temperature)
