"""Labelled images in one folder per class (root/<class>/<image>), for zero-shot classification."""
from __future__ import annotations

import os

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class ImageFolderSource:
    """record -> {"image": encoded bytes, "label": int, "captions": [], "id": "<class>/<file>"}.

    Classes are the sub-folders in sorted order, so labels are stable across machines; `class_names`
    has them with underscores as spaces ("pickup_truck" -> "pickup truck") for prompting.
    """

    def __init__(self, path: str, max_per_class: int = 0):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"Image folder {path!r} does not exist; expected <path>/<class>/<image> files.")
        self.folders = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
        if not self.folders:
            raise ValueError(f"Image folder {path!r} has no class sub-folders; expected <path>/<class>/<image>.")
        self.class_names = [folder.replace("_", " ") for folder in self.folders]
        self.items: list[tuple[str, int]] = []
        for label, folder in enumerate(self.folders):
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
        return f"ImageFolderSource({self.path!r}, {len(self.folders)} classes, {len(self.items)} images)"
