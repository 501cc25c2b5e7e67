"""Zero-shot ImageNet without a class-name file: the bundled 1,000 classes and folders in the synset layout."""
import importlib.resources

import numpy as np
import pytest
from PIL import Image

from siglip_jax.config import default_config, eval_config, source_config, validate
from siglip_jax.data import imagenet
from siglip_jax.data.sources import ImageFolderSource
from siglip_jax.data.tokenizers import ByteTokenizer
from siglip_jax.evaluation import runner
from tests.helpers import OracleEmbedder

# Imagenette's 10 classes: WordNet id, ImageNet label index, CLIP's name (fast.ai's Imagenette README lists
# the same classes as tench, English springer, cassette player, chain saw, church, French horn, garbage
# truck, gas pump, golf ball, parachute).
IMAGENETTE = [
    ("n01440764", 0, "tench"), ("n02102040", 217, "English Springer Spaniel"),
    ("n02979186", 482, "cassette player"), ("n03000684", 491, "chainsaw"), ("n03028079", 497, "church"),
    ("n03394916", 566, "French horn"), ("n03417042", 569, "garbage truck"), ("n03425413", 571, "gas pump"),
    ("n03445777", 574, "golf ball"), ("n03888257", 701, "parachute"),
]
TEMPLATE = "a photo of a {}."


def test_the_bundled_table_is_imagenet_1k_in_label_order():
    classes = imagenet.imagenet_classes()
    assert len(classes) == 1000
    for wnid, label, name in IMAGENETTE:
        assert classes[label] == (wnid, name)
    assert classes[836][1] == "sunglass" and classes[999] == ("n15075141", "toilet paper")
    tfds_labels = importlib.resources.files("tensorflow_datasets").joinpath("datasets/imagenet2012/labels.txt")
    if not tfds_labels.is_file():
        pytest.skip("tensorflow_datasets' imagenet2012 labels.txt is absent")
    assert [wnid for wnid, _ in classes] == tfds_labels.read_text().split()


def _synset_folder(root, wnids, per_class=2):
    for index, wnid in enumerate(wnids):
        (root / wnid).mkdir(parents=True)
        for image in range(per_class):
            Image.new("RGB", (20, 12), (index * 20, image * 90, 50)).save(root / wnid / f"{wnid}_{image}.JPEG")
    return root


def _classify(source, record_labels):
    evaluator = runner.ClassificationSet(source, ByteTokenizer(64), 16, source.class_names, (TEMPLATE,))
    return evaluator.evaluate(OracleEmbedder(source.class_names, TEMPLATE), {"record_labels": np.asarray(record_labels)})


def test_imagenette_folder_scored_against_its_own_classes(tmp_path):
    root = _synset_folder(tmp_path / "val", [wnid for wnid, _, _ in IMAGENETTE])
    source = ImageFolderSource(str(root))
    assert source.class_names == [name for _, _, name in IMAGENETTE]
    labels = [source[index]["label"] for index in range(len(source))]
    assert labels == [label for label in range(10) for _ in range(2)]
    perfect = _classify(source, labels)
    assert perfect["top1"] == 1.0 and perfect["top5"] == 1.0 and perfect["num_images"] == 20
    wrong = _classify(source, [(label + 1) % 10 for label in labels])
    assert wrong["top1"] == 0.0


def test_imagenette_folder_scored_against_all_1000(tmp_path):
    root = _synset_folder(tmp_path / "val", [wnid for wnid, _, _ in IMAGENETTE])
    source = ImageFolderSource(str(root), synsets="all")
    assert len(source.class_names) == 1000 and source.class_names[217] == "English Springer Spaniel"
    labels = [source[index]["label"] for index in range(len(source))]
    assert labels == [label for _, label, _ in IMAGENETTE for _ in range(2)]
    assert _classify(source, labels)["top1"] == 1.0
    # Each image embeds to the class after its own: wrong among 1,000, and its own class ties at 0 with 998.
    wrong = _classify(source, [label + 1 for label in labels])
    assert wrong["top1"] == 0.0 and wrong["top5"] == 0.0


def test_the_option_flows_from_the_config(tmp_path):
    root = _synset_folder(tmp_path / "val", ["n01440764", "n03888257"])
    config = default_config()
    config.evals.imagenette = eval_config("classification", source_config("image_folder", path=str(root), synsets="all"))
    validate(config)
    evaluator = runner.build_evaluators(config, ByteTokenizer(64), lambda s: ImageFolderSource(**s.args.to_dict()))
    assert len(evaluator["imagenette"].class_names) == 1000


def test_folders_outside_the_1000_are_named_with_the_way_out(tmp_path):
    root = _synset_folder(tmp_path / "odd", ["n01440764", "n99999999"], per_class=1)
    with pytest.raises(ValueError, match=r"not among the 1,000 ImageNet-1k classes: n99999999.*class_names.*synsets='off'"):
        ImageFolderSource(str(root))
    mixed = _synset_folder(tmp_path / "mixed", ["n01440764", "cat"], per_class=1)
    with pytest.raises(ValueError, match="not named by WordNet id: cat"):
        ImageFolderSource(str(mixed))
    assert ImageFolderSource(str(mixed), synsets="off").class_names == ["cat", "n01440764"]
    with pytest.raises(ValueError, match="use one of auto, all, off"):
        ImageFolderSource(str(mixed), synsets="imagenet")


def test_plain_class_folders_keep_their_names(tmp_path):
    root = _synset_folder(tmp_path / "plain", ["pickup_truck", "cat"], per_class=1)
    assert ImageFolderSource(str(root)).class_names == ["cat", "pickup truck"]
