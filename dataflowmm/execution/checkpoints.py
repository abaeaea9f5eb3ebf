"""Finished chunks of an unfinished step, kept on disk so a killed run resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dataflowmm.io.atomic import atomic_write_text


class ChunkCheckpoints:
    """Chunk files `chunk_{index}.json` under `folder`, valid for one fingerprint and chunk size.

    Chunks left by a run with another fingerprint or chunk size are discarded, never mixed in.
    """

    def __init__(self, folder: Path, fingerprint: str, chunk_rows: int):
        self.folder = folder
        identity = {"fingerprint": fingerprint, "chunk_rows": chunk_rows}
        meta_path = folder / "meta.json"
        if folder.exists() and not self._meta_matches(meta_path, identity):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not meta_path.exists():
            atomic_write_text(meta_path, json.dumps(identity))

    @staticmethod
    def _meta_matches(meta_path: Path, identity: dict) -> bool:
        try:
            return json.loads(meta_path.read_text()) == identity
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    def _path(self, index: int) -> Path:
        return self.folder / f"chunk_{index:06d}.json"

    def save(self, index: int, chunk: dict) -> None:
        # Atomic rename survives a killed process; without fsync a power cut may leave an
        # empty file, which `load` treats as not done.
        atomic_write_text(self._path(index), json.dumps(chunk, ensure_ascii=False), fsync=False)

    def load(self, index: int) -> dict | None:
        """A finished chunk, or None when it is absent or unreadable (then it is recomputed)."""
        try:
            return json.loads(self._path(index).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
