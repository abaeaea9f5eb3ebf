"""The README's code that a user copies must run."""

import json
import re
from pathlib import Path

from dataflowmm import FileStorage

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(heading: str) -> str:
    section = README.read_text(encoding="utf-8").split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_write_your_own_operator_example(tmp_path):
    entry = tmp_path / "rows.jsonl"
    entry.write_text(json.dumps({"prompt": "a fox"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    storage = FileStorage(entry, cache_path=tmp_path / "cache")
    example = readme_block("Write your own operator")
    assert len(example.strip().splitlines()) <= 25  # a whole operator, small enough to read at once
    exec(example, {"storage": storage})
    rows = [json.loads(line) for line in open(tmp_path / "cache" / "dataflow_cache_step_step1.jsonl")]
    assert rows[0]["loud"] == "A FOX" and rows[0]["error"] is None
    assert rows[1]["loud"] is None and "not a string" in rows[1]["error"]
