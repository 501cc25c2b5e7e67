"""Labelled images in one folder per class (root/<class>/<image>), for zero-shot classification."""
from __future__ import annotations

import os

from siglip_jax.data import imagenet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class ImageFolderSource:
    """record -> {"image": encoded bytes, "label": int, "captions": [], "id": "<class>/<file>"}.

    Classes are the sub-folders in sorted order, so labels are stable across machines; `class_names`
    has them with underscores as spaces ("pickup_truck" -> "pickup truck") for prompting.

    Folders named by WordNet id (ImageNet's synset layout: n01440764/*.JPEG, as ImageNet val and Imagenette
    ship) get ImageNet's cleaned class names ("tench") instead. `synsets`: "auto" (that mapping, the classes
    being the folders' own: Imagenette is 10-way), "all" (scored against all 1,000 ImageNet classes: labels
    are ImageNet label indices, `class_names` all 1,000 names) or "off" (folder names as they are).
    """

    def __init__(self, path: str, max_per_class: int = 0, synsets: str = "auto"):
        if synsets not in imagenet.SYNSET_MODES:
            raise ValueError(f"synsets={synsets!r}; use one of {', '.join(imagenet.SYNSET_MODES)}.")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"Image folder {path!r} does not exist; expected <path>/<class>/<image> files.")
        self.folders = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
        if not self.folders:
            raise ValueError(f"Image folder {path!r} has no class sub-folders; expected <path>/<class>/<image>.")
        labels = list(range(len(self.folders)))
        self.class_names = [folder.replace("_", " ") for folder in self.folders]
        if synsets == "all" or (synsets == "auto" and imagenet.is_synset_layout(self.folders)):
            self.class_names, labels = imagenet.synset_classes(
                self.folders, "all" if synsets == "all" else "own", where=f"Image folder {path!r}")
        self.items: list[tuple[str, int]] = []
        for label, folder in zip(labels, self.folders):
            files = sorted(
                name for name in os.listdir(os.path.join(path, folder)) if name.lower().endswith(IMAGE_EXTENSIONS)
            )
            if max_per_class:
                files = files[:max_per_class]
            self.items.extend((os.path.join(folder, name), label) for name in files)
        if not self.items:
            raise ValueError(f"Image folder {path!r} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)}).")
        self.path = path

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        relative, label = self.items[index]
        with open(os.path.join(self.path, relative), "rb") as stream:
            data = stream.read()
        return {"image": data, "label": label, "captions": [], "id": relative}

    def __repr__(self) -> str:
        return (f"ImageFolderSource({self.path!r}, {len(self.folders)} class folders, {len(self.class_names)} "
                f"classes, {len(self.items)} images)")
