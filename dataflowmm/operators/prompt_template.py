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
        self.fields = template_fields(template)
        if not self.fields:
            raise ValueError(f"template {template!r} names no {{field}}")
        self.template = template

    def required_keys(self) -> list[str]:
        return self.fields

    def process_batch(self, rows: list[dict], row_ids: list[str], context) -> list[dict]:
        out = []
        for offset, row in enumerate(rows):
            try:
                out.append({**row, self.keys.output: filled_template(self.template, self.fields, row)})
            except ValueError as error:
                out.append(self.row_failed(row, str(error), offset))
        return out


def template_fields(template: str) -> list[str]:
    """The columns a `str.format` template reads: `meta` for `{meta[lang]}` or `{meta.lang}`."""
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    return sorted({name.split(".")[0].split("[")[0] for name in names})


def filled_template(template: str, fields: list[str], row: dict) -> str:
    """`template` filled with the row; ValueError naming the first of its `fields` the row
    lacks (or holds null in), or the nested field it lacks ({meta[lang]} with no "lang")."""
    missing = [field for field in fields if row.get(field) is None]
    if missing:
        raise ValueError(f"key {missing[0]!r}: missing")
    try:
        return template.format(**row)
    except KeyError as error:
        raise ValueError(f"template field: key {error.args[0]!r}: missing") from None
    except IndexError as error:
        raise ValueError(f"template field: index out of range ({error})") from None
    except (AttributeError, TypeError, ValueError) as error:  # meta not a dict, a bad format spec
        raise ValueError(f"template field: {error}") from None


__all__ = ["PromptTemplate", "filled_template", "template_fields"]
