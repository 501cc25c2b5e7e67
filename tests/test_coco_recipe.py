"""configs/coco.py end to end on ../shared/data/coco_mini, with a Karpathy split file written from its
annotations (2014-style file names, found in the 2017 folders by COCO id)."""
import importlib.util
import json
import os

import pytest

from siglip_jax.data.from_config import build_source
from siglip_jax.training import metrics, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_MINI = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "coco_mini"))
pytestmark = pytest.mark.skipif(not os.path.isdir(COCO_MINI), reason="../shared/data/coco_mini is absent (real-data test)")


def _recipe(arg):
    spec = importlib.util.spec_from_file_location("coco_recipe", os.path.join(REPO, "configs", "coco.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _karpathy_file(tmp_path):
    """train2017 images as 'train'/'restval' (alternately), val2017 as 'test', in Karpathy's format."""
    entries = []
    for folder, split in (("train2017", "train"), ("val2017", "test")):
        with open(os.path.join(COCO_MINI, "annotations", f"captions_{folder}.json")) as stream:
            coco = json.load(stream)
        captions = {}
        for annotation in coco["annotations"]:
            captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
        for position, image in enumerate(coco["images"]):
            entries.append({
                "filepath": folder.replace("2017", "2014"), "filename": f"COCO_{folder[:-4]}2014_{image['id']:012d}.jpg",
                "cocoid": image["id"], "sentences": [{"raw": text} for text in captions[image["id"]]],
                "split": "restval" if split == "train" and position % 2 else split,
            })
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return str(path), {image_id: texts for image_id, texts in captions.items()}


def test_karpathy_split_reads_test_and_train_plus_restval(tmp_path):
    karpathy, val_captions = _karpathy_file(tmp_path)
    config = _recipe(f"path={COCO_MINI},karpathy={karpathy},size=small")
    test = build_source(config.evals.coco.source)
    assert len(test) == 79 and len(build_source(config.data.train)) == 80
    record = test[0]
    assert record["captions"] == [text.strip() for text in val_captions[int(record["id"])]]
    assert record["image"][:2] == b"\xff\xd8"  # the JPEG found as val2017/<id>.jpg
    without = _recipe(f"path={COCO_MINI},size=small")  # no split file: train2017 -> val2017
    assert len(build_source(without.evals.coco.source)) == 79


def test_bad_recipe_arguments_and_missing_folder_are_explained(tmp_path):
    with pytest.raises(ValueError, match="Unknown coco recipe argument 'karpaty=x'.*keys path, karpathy, size"):
        _recipe("karpaty=x")
    with pytest.raises(FileNotFoundError, match="Karpathy split file not found"):
        build_source(_recipe(f"path={COCO_MINI},karpathy={tmp_path}/none.json").evals.coco.source)


@pytest.mark.slow
def test_coco_recipe_trains_and_evaluates_the_karpathy_test_split(tmp_path):
    """Slow (32-81 s under two workers): the recipe's own towers, data and eval compile programs no other
    test shares."""
    karpathy, _ = _karpathy_file(tmp_path)
    config = _recipe(f"path={COCO_MINI},karpathy={karpathy},size=small")
    config.total_steps, config.log_every_steps, config.eval_every_steps = 2, 1, 0
    config.model.image.image_size, config.model.text.max_len = 16, 16
    for tower in (config.model.image, config.model.text):
        tower.width, tower.depth, tower.mlp_dim, tower.num_heads = 32, 1, 64, 2
    config.data.batch_size, config.data.eval_batch_size = 16, 16
    workdir = tmp_path / "run"
    trainer.train(config, str(workdir))
    records = metrics.read_jsonl(str(workdir / "metrics.jsonl"))
    evals = [record for record in records if "coco/num_images" in record]
    assert evals and evals[-1]["coco/num_images"] == 79 and evals[-1]["step"] == 2
    assert 0.0 <= evals[-1]["coco/image_to_text/recall@10"] <= 1.0
    assert all(0 < record["loss"] < 100 for record in records if "loss" in record)
