"""A LLaVA-style dataset loader written from LLaVA's documented training format (LLaVA-1.5's
`LazySupervisedDataset` and `preprocess_multimodal`), to check what `export --to llava` writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

IMAGE_TOKEN = "<image>"


def load_llava_samples(json_file: Path, image_folder: Path) -> list[dict]:
    """What LLaVA's LazySupervisedDataset does with its documented format: `image` (one path or
    a list) joined to `--image_folder` and opened as RGB; one `<image>` per image, moved to the
    front of its turn by `preprocess_multimodal`; turns alternate human / gpt from a human."""
    samples = []
    for item in json.loads(json_file.read_text()):
        files = item.get("image", [])
        files = [files] if isinstance(files, str) else files
        images = [Image.open(os.path.join(image_folder, name)).convert("RGB") for name in files]
        turns = item["conversations"]
        assert [turn["from"] for turn in turns] == ["human", "gpt"] * (len(turns) // 2)
        tokens = sum(turn["value"].count(IMAGE_TOKEN) for turn in turns)
        assert tokens == len(images), item
        for turn in turns:
            if IMAGE_TOKEN in turn["value"]:
                text = turn["value"].replace(IMAGE_TOKEN, "").strip()
                turn["value"] = (IMAGE_TOKEN + "\n") * turn["value"].count(IMAGE_TOKEN) + text
        samples.append({"id": item["id"], "images": images, "conversations": turns})
    return samples
