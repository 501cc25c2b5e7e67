"""Search CLI: index a folder, query it, top-k ranking matches brute force, HTML page shows the images."""
import os

import numpy as np

from siglip_jax.data import images as images_lib
from siglip_jax.inference import predictor, search
from siglip_jax.io import params as params_lib
from tests.helpers import tiny_config
from tests.params_helpers import random_params


def test_index_and_query(tmp_path, capsys):
    config = tiny_config()
    model_path = str(tmp_path / "model.msgpack")
    params_lib.save_params_file(model_path, config, random_params(config))
    image_dir = tmp_path / "images"
    (image_dir / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(5):
        folder = image_dir / "nested" if index % 2 else image_dir
        with open(folder / f"photo {index}.png", "wb") as file:  # a space, to test URL quoting
            file.write(images_lib.encode_image(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)))
    (image_dir / "broken.jpg").write_bytes(b"not an image")
    (image_dir / "notes.txt").write_text("ignored")

    index_path = str(tmp_path / "index.npz")
    search.main(["index", str(image_dir), "--model", model_path, "--output", index_path])
    captured = capsys.readouterr()
    assert "indexed 5 images" in captured.out and "skipping" in captured.err and "broken.jpg" in captured.err

    html_path = str(tmp_path / "results.html")
    search.main(["query", index_path, "a dog on a beach", "-k", "3", "--html", html_path])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 3
    assert "probability: sigmoid(t*cos + b) per pair" in captured.err  # what the numbers are, for this model's loss
    rows = [line.split("\t") for line in lines]
    cosines = [float(row[2]) for row in rows]
    assert cosines == sorted(cosines, reverse=True)

    embedder = predictor.load(model_path)
    index = search.load_index(index_path)
    brute_force = index.embeddings @ embedder.embed_texts(["a dog on a beach"])[0]
    expected = [index.paths[i] for i in np.argsort(-brute_force)[:3]]
    assert [row[3] for row in rows] == expected
    assert all(os.path.isfile(row[3]) for row in rows)

    page = open(html_path, encoding="utf-8").read()
    assert page.count("<img ") == 3 and "photo%20" in page and "a dog on a beach" in page
