"""The 1,000 ImageNet-1k classes (WordNet ids and the cleaned names CLIP prompts with), and the class names and
labels of a folder in ImageNet's synset layout (root/n01440764/*.JPEG, as ImageNet val and Imagenette ship).

The table is package data (imagenet_classes.tsv, with its sources in its header), so zero-shot ImageNet needs
no class-name file and no download.
"""
from __future__ import annotations

import functools
import importlib.resources
import re
from typing import Sequence

NUM_CLASSES = 1000
WNID_PATTERN = re.compile(r"n\d{8}")
SYNSET_MODES = ("auto", "all", "off")


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """(WordNet id, class name) of the 1,000 classes, in ImageNet label order (the sorted ids)."""
    table = importlib.resources.files("siglip_jax.data").joinpath("imagenet_classes.tsv")
    rows = tuple(
        tuple(line.split("\t")) for line in table.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )
    if len(rows) != NUM_CLASSES or any(len(row) != 2 for row in rows):
        raise RuntimeError(f"{table} is damaged: expected {NUM_CLASSES} 'wnid<TAB>name' rows; reinstall siglip_jax.")
    return rows


@functools.cache
def _label_of_wnid() -> dict[str, int]:
    return {wnid: label for label, (wnid, _) in enumerate(imagenet_classes())}


def is_synset_layout(folders: Sequence[str]) -> bool:
    """Whether any folder is named like a WordNet id (n + 8 digits)."""
    return any(WNID_PATTERN.fullmatch(folder) for folder in folders)


def synset_classes(folders: Sequence[str], scored_against: str = "own", where: str = "the folder"
                   ) -> tuple[list[str], list[int]]:
    """Class names and each folder's label for class folders named by WordNet id.

    Args:
      folders: the class folders, in label order for scored_against="own".
      scored_against: "own": the folders' own classes (labels 0..len-1, names of those classes), so a
        subset such as Imagenette's 10 is a 10-way task; "all": all 1,000 classes (labels are ImageNet
        label indices, names all 1,000), as when reporting a subset's accuracy on the full task.
      where: names the folder in errors.
    Returns:
      (class_names, label of each folder).
    """
    label_of_wnid = _label_of_wnid()
    not_synsets = [folder for folder in folders if not WNID_PATTERN.fullmatch(folder)]
    unknown = [folder for folder in folders if WNID_PATTERN.fullmatch(folder) and folder not in label_of_wnid]
    if not_synsets or unknown:
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} WordNet id(s) not among the 1,000 ImageNet-1k classes: "
                            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
        if not_synsets:
            problems.append(f"{len(not_synsets)} folder(s) not named by WordNet id: "
                            f"{', '.join(not_synsets[:10])}{' ...' if len(not_synsets) > 10 else ''}")
        raise ValueError(
            f"{where} looks like ImageNet's synset layout (class folders named n01440764 ...) but has "
            f"{' and '.join(problems)}. Give the class names yourself: the eval's class_names (a file, one "
            "name a line, in sorted folder order) with synsets='off' in the source args, which also makes the "
            "folder names the class names.")
    names = [name for _, name in imagenet_classes()]
    if scored_against == "all":
        return names, [label_of_wnid[folder] for folder in folders]
    if scored_against != "own":
        raise ValueError(f"scored_against must be 'own' or 'all', not {scored_against!r}.")
    return [names[label_of_wnid[folder]] for folder in folders], list(range(len(folders)))
