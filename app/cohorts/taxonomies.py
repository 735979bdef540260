"""Taxonomies: named classes, each a conjunction of label predicates. Presets are data (presets.yaml)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Cohort, Taxonomy
from app.errors import Conflict, InvalidInput, NotFound
from app.labels.engine import RuleSet

PRESETS_FILE = Path(__file__).with_name("presets.yaml")
LABEL_KEYS = ("modality", "body_part", "view", "laterality", "sex", "age_years", "age_band")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_CS_RE = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # DICOM Code String (Modality)


class TaxonomyInvalid(InvalidInput):
    """422 with field-level detail: `errors` is a list of {"loc", "msg", "type"}."""

    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(e["msg"] for e in errors))
        self.errors = errors


@lru_cache(maxsize=1)
def presets() -> dict[str, dict]:
    """Built-in taxonomies by name, in the shape the API returns."""
    data = yaml.safe_load(PRESETS_FILE.read_text(encoding="utf-8"))
    return {name: {"name": name, "description": t.get("description"), "builtin": True, "classes": t["classes"]}
            for name, t in data.items()}


def _row_dict(row: Taxonomy) -> dict:
    return {"name": row.name, "description": row.description, "builtin": False, "classes": row.classes,
            "created_at": row.created_at}


def list_taxonomies(session: Session) -> list[dict]:
    out = [dict(t, created_at=None) for t in presets().values()]
    out += [_row_dict(r) for r in session.scalars(select(Taxonomy).order_by(Taxonomy.name))]
    return out


def get_taxonomy(session: Session, name: str) -> dict:
    if name in presets():
        return dict(presets()[name], created_at=None)
    row = session.scalar(select(Taxonomy).where(Taxonomy.name == name))
    if row is None:
        raise NotFound(f"taxonomy '{name}' not found")
    return _row_dict(row)


def validate_where(where: Any, rules: RuleSet, loc: list) -> tuple[dict, list[dict]]:
    """Check one class's predicates against the label names and vocabularies; normalize values."""
    errors: list[dict] = []

    def err(key_loc: list, msg: str) -> None:
        errors.append({"loc": key_loc, "msg": msg, "type": "value_error"})

    if not isinstance(where, dict) or not where:
        err(loc, "where must be a non-empty object of label predicates")
        return {}, errors
    out: dict[str, Any] = {}
    bands = set(rules.age_bands())
    for key, value in where.items():
        kloc = loc + [key]
        if key not in LABEL_KEYS:
            err(kloc, f"unknown label '{key}'; allowed: {', '.join(LABEL_KEYS)}")
            continue
        if key == "age_years":
            if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
                err(kloc, "age_years must be a number or a range {\"min\", \"max\"}")
                continue
            if isinstance(value, dict):
                extra = set(value) - {"min", "max"}
                nums = {k: v for k, v in value.items() if k in ("min", "max")}
                if extra or not nums:
                    err(kloc, "an age_years range has keys 'min' and/or 'max' only")
                    continue
                if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in nums.values()):
                    err(kloc, "age_years min/max must be non-negative numbers")
                    continue
                if "min" in nums and "max" in nums and nums["min"] > nums["max"]:
                    err(kloc, "age_years min is greater than max")
                    continue
                out[key] = nums
            else:
                if value < 0:
                    err(kloc, "age_years must be non-negative")
                    continue
                out[key] = value
            continue
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) for v in values):
            err(kloc, f"{key} must be a string or a non-empty list of strings")
            continue
        if key == "modality":
            bad = [v for v in values if not _CS_RE.match(v)]
            allowed_msg = "a DICOM modality code (upper case, at most 16 characters)"
        elif key == "age_band":
            bad = [v for v in values if v not in bands]
            allowed_msg = f"one of {sorted(bands, key=lambda b: int(b.split('-')[0].rstrip('+')))}"
        else:
            vocab = rules.vocabulary[key]
            bad = [v for v in values if v not in vocab]
            allowed_msg = f"one of {vocab}"
        if bad:
            err(kloc, f"unknown {key} value {bad[0]!r}: expected {allowed_msg}")
            continue
        out[key] = value
    return out, errors


def validate_taxonomy(payload: dict, rules: RuleSet) -> dict:
    """A normalized taxonomy dict, or TaxonomyInvalid listing every bad field."""
    errors: list[dict] = []
    name = payload.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        errors.append({"loc": ["body", "name"], "type": "value_error",
                       "msg": "name must be 1-64 characters: letters, digits, '_', '-', '.'"})
    classes = payload.get("classes")
    out_classes = []
    if not isinstance(classes, list) or not classes:
        errors.append({"loc": ["body", "classes"], "msg": "classes must be a non-empty list", "type": "value_error"})
        classes = []
    seen = set()
    for i, c in enumerate(classes):
        loc = ["body", "classes", i]
        if not isinstance(c, dict):
            errors.append({"loc": loc, "msg": "a class is an object {name, where}", "type": "value_error"})
            continue
        cname = c.get("name")
        if not isinstance(cname, str) or not _NAME_RE.match(cname):
            errors.append({"loc": loc + ["name"], "type": "value_error",
                           "msg": "class name must be 1-64 characters: letters, digits, '_', '-', '.'"})
        elif cname in seen:
            errors.append({"loc": loc + ["name"], "msg": f"duplicate class name '{cname}'", "type": "value_error"})
        seen.add(cname)
        where, errs = validate_where(c.get("where"), rules, loc + ["where"])
        errors += errs
        out_classes.append({"name": cname, "where": where})
    if errors:
        raise TaxonomyInvalid(errors)
    return {"name": name, "description": payload.get("description"), "classes": out_classes}


def create_taxonomy(session: Session, payload: dict, rules: RuleSet) -> dict:
    """Validate and store a user taxonomy (409 when the name is taken, presets included)."""
    tax = validate_taxonomy(payload, rules)
    if tax["name"] in presets() or session.scalar(select(Taxonomy.id).where(Taxonomy.name == tax["name"])):
        raise Conflict(f"taxonomy '{tax['name']}' already exists")
    row = Taxonomy(name=tax["name"], classes=tax["classes"], description=tax["description"], builtin=False)
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError as exc:  # a concurrent request took the name
        raise Conflict(f"taxonomy '{tax['name']}' already exists") from exc
    return _row_dict(row)


def matches(where: dict, labels: dict) -> bool:
    """Python twin of the SQL class predicate: does a label dict (modality, body_part, view, ...)
    satisfy a class's `where`? age_years ranges are whole years, both ends inclusive."""
    for key, want in where.items():
        have = labels.get(key)
        if key == "age_years":
            rng = want if isinstance(want, dict) else {"min": want, "max": want}
            if have is None:
                return False
            if rng.get("min") is not None and have < rng["min"]:
                return False
            if rng.get("max") is not None and have >= int(rng["max"]) + 1:
                return False
        elif isinstance(want, list):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


def delete_taxonomy(session: Session, name: str) -> None:
    """Delete a user taxonomy; Conflict for a preset or one that cohorts were built from."""
    if name in presets():
        raise Conflict(f"taxonomy '{name}' is a preset; presets cannot be deleted")
    row = session.scalar(select(Taxonomy).where(Taxonomy.name == name))
    if row is None:
        raise NotFound(f"taxonomy '{name}' not found")
    used = list(session.scalars(select(Cohort.id).where(Cohort.taxonomy_name == name).order_by(Cohort.id).limit(21)))
    if used:
        more = " and more" if len(used) > 20 else ""
        raise Conflict(f"taxonomy '{name}' is used by cohort(s) {', '.join(map(str, used[:20]))}{more}: "
                       "delete those first")
    session.delete(row)
    session.flush()
