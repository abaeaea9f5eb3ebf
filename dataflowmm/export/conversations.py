"""A step as LLaVA or ShareGPT training JSON: one record per row with its images and a
conversation, the images copied (or hard-linked) into a folder beside the JSON.

LLaVA (`--to llava`), as LLaVA-1.5's `llava_v1_5_mix665k.json` and LLaVA-NeXT's loader read it:

    {"id": "000000012", "image": "llava_images/000000012.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "red"}]}

`image` is one path, or a list for a row with several images (LLaVA-NeXT / OneVision).
ShareGPT (`--to sharegpt`, LLaMA-Factory's multimodal ShareGPT) has the same turns and
`images`, always a list. Image paths are relative to the JSON's folder: give that folder
to LLaVA's `--image_folder` (LLaMA-Factory: `media_dir`).

Each image gets one `<image>` token: a conversation that has none gets them prepended
to its first human turn (followed by a newline, where LLaVA's preprocessing puts them);
Data-Juicer's `<__dj__image>` becomes `<image>`; a conversation whose token count differs
from its row's image count stops the export naming the row. OpenAI-style turns
(`{"role": "user", "content": ...}`) become `{"from": "human", "value": ...}`.

Conversations come from a conversation column (default `conversations` when the step has
one), else from a text column (`--text-column`, else the first of `TEXT_COLUMNS` the rows
have) as one description turn: `prompt` (default `DESCRIBE_PROMPT`) asked, the text answered.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path
from typing import Any

import orjson

from dataflowmm.export.training_rows import (
    DETECTION_ROWS,
    TrainingRow,
    TrainingRows,
    detect_image_columns,
    sample_key,
    text_column_of,
)
from dataflowmm.io.atomic import atomic_file
from dataflowmm.io.records import iter_records

IMAGE_TOKEN = "<image>"  # LLaVA's and ShareGPT's placeholder for an image in a turn
_DJ_IMAGE_TOKEN = "<__dj__image>"
DESCRIBE_PROMPT = "Describe the image."
_ROLES = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt", "system": "system"}
STYLES = ("llava", "sharegpt")


def _turns(conversation: Any, where: str) -> list[dict]:
    """`conversation` as `{"from", "value"}` turns, with `<image>` as the image token."""
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"{where}: expected a non-empty list of turns, got {conversation!r}")
    turns = []
    for index, turn in enumerate(conversation):
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role not in _ROLES or not isinstance(value, str):
            raise ValueError(f"{where}: turn {index} is not a {{from, value}} or {{role, content}} turn "
                             f"with text: {turn!r}")
        turns.append({"from": _ROLES[role], "value": value.replace(_DJ_IMAGE_TOKEN, IMAGE_TOKEN)})
    return turns


def _with_image_tokens(turns: list[dict], images: int, where: str) -> list[dict]:
    """One `<image>` per image: prepended to the first human turn when the turns have none."""
    found = sum(turn["value"].count(IMAGE_TOKEN) for turn in turns)
    if found == images:
        return turns
    if found:
        raise ValueError(f"{where}: {found} {IMAGE_TOKEN} tokens for {images} images")
    first_human = next((index for index, turn in enumerate(turns) if turn["from"] == "human"), None)
    if first_human is None:
        raise ValueError(f"{where}: no human turn to put the {IMAGE_TOKEN} tokens in")
    turn = turns[first_human]
    turns = list(turns)
    turns[first_human] = {**turn, "value": f"{IMAGE_TOKEN}\n" * images + turn["value"]}
    return turns


def _description_turns(text: Any, prompt: str, where: str) -> list[dict]:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: no text to describe the image with ({text!r})")
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": text.strip()}]


def _copy_image(source, target: Path, link: bool) -> None:
    if source.file is None:
        target.write_bytes(source.data)
        return
    if link:
        target.unlink(missing_ok=True)
        try:
            os.link(source.file, target)
            return
        except OSError:  # another file system, or links not allowed: copy instead
            pass
    shutil.copyfile(source.file, target)


class ConversationExport:
    """Writes one step as LLaVA or ShareGPT JSON; see the module's docstring."""

    def __init__(self, step_file: str | os.PathLike, out: str | os.PathLike, style: str = "llava", *,
                 image_columns: list[str] | None = None, conversation_column: str | None = None,
                 text_column: str | None = None, prompt: str = DESCRIBE_PROMPT, link: bool = False):
        if style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        self.step_file = Path(step_file)
        self.out = Path(out)
        self.images_dir = self.out.with_name(f"{self.out.stem}_images")
        self.style = style
        self.prompt = prompt
        self.link = link
        first_rows = list(itertools.islice(iter_records(self.step_file), DETECTION_ROWS))
        if image_columns is None:  # from the rows already read, not a second read by TrainingRows
            image_columns = detect_image_columns(first_rows)
        if conversation_column is None and any("conversations" in row for row in first_rows):
            conversation_column = "conversations"
        self.conversation_column = conversation_column
        self.text_column = None if conversation_column else (text_column or text_column_of(first_rows))
        if not self.conversation_column and not self.text_column:
            raise KeyError(f"{self.step_file}: no conversation column and no text column to make one from; "
                           f"name one (--conversation-column / --text-column)")
        # A conversation may be text-only (LLaVA mixes such samples in); a description needs its image.
        self.rows = TrainingRows(step_file, image_columns, require_image=not self.conversation_column)

    def write(self) -> dict[str, int]:
        """Write the images, then the JSON (atomically); returns the counts of the export."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        written: set[str] = set()
        with atomic_file(self.out) as file:
            file.write(b"[")
            for number, training_row in enumerate(self.rows):
                file.write(b",\n" if number else b"\n")
                file.write(orjson.dumps(self._record(training_row, written)))
            file.write(b"\n]\n")
        for stale in self.images_dir.iterdir():  # from an earlier export of other rows
            if stale.name not in written:
                stale.unlink()
        return self.rows.counts()

    def _record(self, training_row: TrainingRow, written: set[str]) -> dict:
        key = sample_key(training_row.index)
        where = f"{self.step_file}: row {training_row.index}"
        paths = []
        images = training_row.image_list()
        for position, image in enumerate(images):
            name = f"{key}.{image.extension}" if len(images) == 1 else f"{key}_{position}.{image.extension}"
            _copy_image(image, self.images_dir / name, self.link)
            written.add(name)
            paths.append(f"{self.images_dir.name}/{name}")
        if self.conversation_column:
            column = self.conversation_column
            turns = _turns(training_row.row.get(column), f"{where}, column {column!r}")
        else:
            column = self.text_column
            turns = _description_turns(training_row.row.get(column), self.prompt, f"{where}, column {column!r}")
        turns = _with_image_tokens(turns, len(paths), f"{where}, column {column!r}")
        identity = training_row.row.get("id")
        record: dict[str, Any] = {"id": str(identity) if identity not in (None, "") else key}
        if self.style == "sharegpt":
            record["images"] = paths
        elif paths:
            record["image"] = paths[0] if len(paths) == 1 else paths
        record["conversations"] = turns
        return record
