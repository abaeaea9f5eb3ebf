"""PromptTemplate: build a text column from other columns, e.g. prompts for text-to-image.

Also the example to copy when writing your own operator: a subclass, its declared
`columns`, a `process_batch`, and `row_failed` for a row it cannot handle. Constructor
arguments are recorded for the cache fingerprint; resume, caching, progress, error counts
and the Ray runner come from the framework.
"""

from __future__ import annotations

import string

from dataflowmm.contract import Operator, Output


class PromptTemplate(Operator):
    """Fill a `str.format` template with each row's fields.

    `PromptTemplate("a photo of {subject}, {style}")` turns `{"subject": "a red fox",
    "style": "watercolour"}` into `"a photo of a red fox, watercolour"`. A row missing a field
    (or holding null there), nested ones included (`{meta[lang]}` with no `lang` in `meta`,
    or `meta` not a dict), is kept with an empty output and its `error` set.

    Args:
        template: the template; its `{field}` names are the columns it reads.
        save_interval: rows between checkpoints.
        strict: raise on the first row missing a field instead of recording its error.
    """

    columns = [Output("output", "output_key", "prompt", "column receiving the filled template", empty="")]
    default_input_batch_size = 1024  # no model: a batch is just a unit of work

    def __init__(self, template: str, *, save_interval: int = 10_000, strict: bool = False):
        self.fields = sorted({_root(name) for _, name, _, _ in string.Formatter().parse(template) if name})
        if not self.fields:
            raise ValueError(f"template {template!r} names no {{field}}")
        self.template = template

    def required_keys(self) -> list[str]:
        return self.fields

    def process_batch(self, rows: list[dict], row_ids: list[str], context) -> list[dict]:
        out = []
        for offset, row in enumerate(rows):
            missing = [field for field in self.fields if row.get(field) is None]
            if missing:
                out.append(self.row_failed(row, f"key {missing[0]!r}: missing", offset))
                continue
            try:
                text = self.template.format(**row)
            except (KeyError, IndexError, AttributeError, TypeError, ValueError) as error:
                # a nested field the row lacks ({meta[lang]} with no "lang"; meta not a dict)
                out.append(self.row_failed(row, f"template field: {_reason(error)}", offset))
                continue
            out.append({**row, self.keys.output: text})
        return out


def _reason(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"key {error.args[0]!r}: missing"
    if isinstance(error, IndexError):
        return f"index out of range ({error})"
    return str(error)


def _root(field: str) -> str:
    """The column a template field reads: `meta` for `{meta[lang]}` or `{meta.lang}`."""
    return field.split(".")[0].split("[")[0]


__all__ = ["PromptTemplate"]
