"""A site's rules overlay: terms added to the built-in rules without forking them.

An overlay is a YAML file with `extends: builtin` (used wherever a rules file is: RADCOHORT_LABEL_RULES,
`radcohort labels relabel --rules`). It may add description terms, tag values, ignored phrases,
multi-view patterns, refinements and placeholder birth dates; values must be built-in vocabulary
values. Validation (a pydantic schema plus vocabulary checks) reports each error with its line.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from typing_extensions import Annotated

from app.labels.engine import BUILTIN_RULES, RuleSet, RulesError, merge_overlay

Term = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
TextLabel = Literal["body_part", "view", "laterality", "species"]
TagLabel = Literal["body_part", "view", "laterality", "sex", "species"]


class _Age(BaseModel):
    model_config = ConfigDict(extra="forbid")
    placeholder_birth_dates: list[Annotated[str, StringConstraints(pattern=r"^\d{8}$")]] = []


class OverlaySchema(BaseModel):
    """What an overlay may hold (anything else is an error: a typo must not be ignored silently)."""

    model_config = ConfigDict(extra="forbid")
    extends: Literal["builtin"]
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,31}$")] | None = None
    version: int | Term = 1
    text: dict[TextLabel, dict[Term, list[Term]]] = Field(default_factory=dict)
    tag_values: dict[TagLabel, dict[Term, Term]] = Field(default_factory=dict)
    text_ignore: dict[TextLabel, list[Term]] = Field(default_factory=dict)
    multi_view_patterns: list[Term] = Field(default_factory=list)
    refines: dict[Literal["body_part", "view"], dict[Term, list[Term]]] = Field(default_factory=dict)
    age: _Age | None = None


class OverlayError(RulesError):
    """An invalid overlay; `errors` = [{"line", "column", "path", "message"}]."""

    def __init__(self, errors: list[dict], source: str = "overlay"):
        self.errors = errors
        lines = "; ".join(f"line {e['line']}: {e['path']}: {e['message']}" if e.get("line")
                          else f"{e['path']}: {e['message']}" for e in errors)
        super().__init__(f"{source}: {lines}")


def _node_at(root: yaml.Node | None, path: tuple) -> yaml.Node | None:
    """The deepest YAML node along `path` (mapping keys by value, sequence items by index)."""
    node, found = root, root
    for part in path:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if str(k.value) == str(part):
                    found, nxt = k, v
                    break
            if nxt is None:
                return found
            node = nxt
            if not isinstance(nxt, (yaml.MappingNode, yaml.SequenceNode)):
                found = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = found = node.value[part]
        else:
            return found
    return found


def _err(root, path: tuple, message: str) -> dict:
    node = _node_at(root, path)
    line = node.start_mark.line + 1 if node is not None else None
    col = node.start_mark.column + 1 if node is not None else None
    return {"line": line, "column": col, "path": ".".join(map(str, path)) or "(top)", "message": message}


def validate_overlay(text: str, base: dict | None = None) -> tuple[dict | None, list[dict]]:
    """(the overlay data, errors) for an overlay's YAML text; errors carry line and column."""
    try:
        for event in yaml.parse(text):
            if isinstance(event, yaml.AliasEvent):  # aliases can expand a small upload enormously
                m = event.start_mark
                return None, [{"line": m.line + 1, "column": m.column + 1, "path": "(yaml)",
                               "message": "YAML aliases are not allowed in an overlay"}]
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        return None, [{"line": mark.line + 1 if mark else None, "column": mark.column + 1 if mark else None,
                       "path": "(yaml)", "message": str(getattr(exc, "problem", None) or exc)}]
    if not isinstance(data, dict):
        return None, [_err(root, (), "an overlay is a mapping with 'extends: builtin'")]
    try:
        model = OverlaySchema.model_validate(data)
    except ValidationError as exc:
        errs = []
        for e in exc.errors():
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("int", "str")))
            errs.append(_err(root, loc, e["msg"]))
        return None, errs
    base = base if base is not None else yaml.safe_load(BUILTIN_RULES.read_text(encoding="utf-8"))
    vocab = base["vocabulary"]
    errs = []
    for label, mapping in model.text.items():
        for value in mapping:
            if value not in vocab.get(label, []):
                errs.append(_err(root, ("text", label, value), f"'{value}' is not a {label} value "
                                 f"(one of: {', '.join(vocab.get(label, []))})"))
    for label, mapping in model.tag_values.items():
        for key, value in mapping.items():
            if value not in vocab.get(label, []):
                errs.append(_err(root, ("tag_values", label, key), f"'{value}' is not a {label} value"))
    for label, mapping in model.refines.items():
        for specific, generals in mapping.items():
            for i, v in enumerate([specific, *generals]):
                if v not in vocab.get(label, []):
                    path = ("refines", label, specific) if i == 0 else ("refines", label, specific, i - 1)
                    errs.append(_err(root, path, f"'{v}' is not a {label} value"))
    for i, pattern in enumerate(model.multi_view_patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            errs.append(_err(root, ("multi_view_patterns", i), f"not a regular expression: {exc}"))
    return data, errs


def apply_overlay_text(text: str, source: str = "overlay", base: dict | None = None) -> RuleSet:
    """The built-in rules with a site overlay applied (OverlayError with line-level errors)."""
    base = base if base is not None else yaml.safe_load(BUILTIN_RULES.read_text(encoding="utf-8"))
    data, errs = validate_overlay(text, base)
    if errs:
        raise OverlayError(errs, source)
    assert data is not None
    return RuleSet(merge_overlay(base, data))


def overlay_summary(data: dict[str, Any]) -> dict:
    """How many terms an overlay adds, per section and label (for the CLI)."""
    out: dict = {}
    for section in ("text", "tag_values", "text_ignore", "refines"):
        for label, mapping in (data.get(section) or {}).items():
            n = sum(len(v) if isinstance(v, list) else 1 for v in mapping.values()) if isinstance(mapping, dict) \
                else len(mapping)
            out[f"{section}.{label}"] = n
    return out
