"""The eval runner: embedding with padding, retrieval and zero-shot classification wiring."""
import os

import jax
import numpy as np
import pytest

from siglip_jax.config import DEFAULT_AXIS_RULES, EVAL_KINDS
from siglip_jax.data.sources import ImageFolderSource
from siglip_jax.data.tokenizers import ByteTokenizer
from siglip_jax.evaluation import runner
from siglip_jax.inference.embedder import Embedder
from siglip_jax.runtime import sharding
from tests.helpers import OracleEmbedder

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "cifar10", "test")),
                    reason="../shared/data/cifar10 is absent (real-data test)")
def test_zero_shot_classification_on_cifar10_folder():
    source = ImageFolderSource(os.path.join(SHARED_DATA, "cifar10", "test"), max_per_class=3)
    assert source.class_names[:3] == ["airplane", "automobile", "bird"] and len(source) == 30
    evaluator = runner.ClassificationSet(source, ByteTokenizer(32), 16, source.class_names, ("a photo of a {}.",))
    embedder = OracleEmbedder(source.class_names, max_len=32)
    labels = np.array([source[index]["label"] for index in range(len(source))])
    # An embedder that sees the true labels scores 1.0; one that sees shifted labels scores 0.
    perfect = evaluator.evaluate(embedder, {"record_labels": labels})
    assert perfect["top1"] == 1.0 and perfect["mean_per_class_recall"] == 1.0
    assert embedder.chunk_sizes == [4] * 7 + [2]  # streamed a batch at a time, never the whole set
    wrong = evaluator.evaluate(embedder, {"record_labels": (labels + 1) % 10})
    # The true class ties at score 0 with 8 others behind the wrong one; ties count against it.
    assert wrong["top1"] == 0.0 and wrong["top5"] == 0.0
    assert perfect["num_images"] == 30


def test_embedder_pads_the_last_batch_and_keeps_order():
    from siglip_jax.models import two_towers
    from tests.helpers import tiny_config

    config = tiny_config()
    mesh = sharding.create_mesh((-1, 1, 1), ("data", "fsdp", "tensor"))
    model = two_towers.build_model(config.model)
    images = np.random.default_rng(0).integers(0, 256, (21, 16, 16, 3)).astype(np.uint8)
    params = model.init(jax.random.key(0), images[:1], np.ones((1, 12), np.int32))["params"]
    import flax.linen as nn

    params = nn.unbox(params)
    embedder = Embedder(model, mesh, DEFAULT_AXIS_RULES, batch_size=8)
    batched = embedder.images(params, images)  # 8 + 8 + 5 (padded)
    direct = model.apply({"params": params}, images, method=model.embed_images)
    assert batched.shape == (21, 32)
    np.testing.assert_allclose(batched, direct, rtol=1e-5, atol=1e-6)


class _Uncaptioned:
    """Demo records with record 3's captions removed: it must be skipped, its image left out."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        record = self.inner[index]
        return {**record, "captions": []} if index == 3 else record


class _Recording:
    """The real Embedder, keeping what embed_shares returned and how many rows each chunk had."""

    def __init__(self, embedder):
        self.embedder, self.results, self.chunk_sizes = embedder, {}, {}
        self.rows_per_process = embedder.rows_per_process

    def embed_shares(self, tower, params, local_chunks, empty_inputs, key_columns=1):
        sizes = self.chunk_sizes.setdefault(tower, [])

        def counted():
            for inputs, keys in local_chunks:
                sizes.append(len(inputs))
                yield inputs, keys

        self.results[tower] = self.embedder.embed_shares(tower, params, counted(), empty_inputs, key_columns)
        return self.results[tower]


def test_retrieval_streams_batches_and_matches_the_model_applied_whole():
    from siglip_jax.data.demo import DemoSource
    from siglip_jax.evaluation import retrieval
    from siglip_jax.models import two_towers
    from tests.helpers import tiny_config
    from tests.params_helpers import random_params

    config = tiny_config()
    model = two_towers.build_model(config.model)
    params = random_params(config)
    mesh = sharding.create_mesh((-1, 1, 1), ("data", "fsdp", "tensor"))
    source = _Uncaptioned(DemoSource("eval", 11, 16))
    tokenizer = ByteTokenizer(12)
    embedder = _Recording(Embedder(model, mesh, DEFAULT_AXIS_RULES, batch_size=8))
    metrics = runner.RetrievalSet(source, tokenizer, 16).evaluate(embedder, params)

    kept = [index for index in range(11) if index != 3]
    assert embedder.chunk_sizes == {"image": [8, 2], "text": [8, 8, 8, 8, 8, 8, 2]}  # 10 images, 50 captions
    from siglip_jax.data import images as images_lib  # the eval preprocessing is not what is tested here

    images = np.stack([images_lib.eval_transform(images_lib.decode_image(source[index]["image"]), 16) for index in kept])
    captions = [caption for index in kept for caption in source[index]["captions"]]
    caption_image_ids = np.repeat(np.arange(10), 5)
    image_embeddings, image_keys = embedder.results["image"]
    text_embeddings, text_keys = embedder.results["text"]
    assert image_keys[:, 0].tolist() == kept and text_keys[:, 0].tolist() == np.repeat(kept, 5).tolist()
    np.testing.assert_allclose(image_embeddings, model.apply({"params": params}, images, method=model.embed_images),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text_embeddings, model.apply({"params": params}, tokenizer(captions),
                                                            method=model.embed_texts), rtol=1e-5, atol=1e-6)
    expected = retrieval.retrieval_metrics(image_embeddings, text_embeddings, caption_image_ids)
    assert metrics == {**expected, "num_images": 10.0, "num_skipped": 1.0}


def test_every_eval_kind_the_config_accepts_has_a_builder_and_no_other():
    assert tuple(runner.EVALUATORS) == EVAL_KINDS
