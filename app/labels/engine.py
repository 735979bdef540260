"""Pure label engine: index record fields -> normalized labels with provenance and conflicts.

No database, no I/O beyond reading a rules file in `load_rules`. The rules (sources in priority
order, vocabularies, English/Japanese description terms) are data: see `rules.yaml`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import yaml

BUILTIN_RULES = Path(__file__).with_name("rules.yaml")
LABELS = ("body_part", "view", "laterality", "sex", "age_years", "age_band")
_CATEGORICAL = ("body_part", "view", "laterality")
_TAG_NAMES = {  # column -> DICOM keyword, for provenance
    "body_part_examined": "BodyPartExamined",
    "view_position": "ViewPosition",
    "image_laterality": "ImageLaterality",
    "laterality": "Laterality",
    "patient_sex": "PatientSex",
    "patient_age": "PatientAge",
    "series_description": "SeriesDescription",
    "study_description": "StudyDescription",
    "protocol_name": "ProtocolName",
    "requested_procedure_description": "RequestedProcedureDescription",
}
_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$")


class RulesError(ValueError):
    """The rules file is malformed (the message names the offending key)."""


def normalize_text(value: Any) -> str:
    """NFKC (full/half-width folding) + upper case + collapsed whitespace."""
    if value is None:
        return ""
    s = unicodedata.normalize("NFKC", str(value)).upper()
    return " ".join(s.split())


def _tag_key(value: Any) -> str:
    return re.sub(r"[\s_\-]+", "", normalize_text(value))


def _term_regex(term: str) -> re.Pattern:
    t = normalize_text(term)
    if t.isascii():
        # whole words only: "PA" must not match inside "PARANASAL"; a lone letter ("L") not in "L-SPINE"
        edge = "A-Z0-9\\-" if len(t) == 1 else "A-Z0-9"
        return re.compile(rf"(?<![{edge}])" + re.escape(t) + rf"(?![{edge}])")
    return re.compile(re.escape(t))


@dataclass(frozen=True)
class LabelResult:
    body_part: str | None = None
    view: str | None = None
    laterality: str | None = None
    sex: str | None = None
    age_years: float | None = None
    age_band: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    conflicts: list[dict] = field(default_factory=list)

    @property
    def has_conflict(self) -> bool:
        return bool(self.conflicts)

    def as_columns(self, ruleset_version: str) -> dict:
        """The `instances` label columns."""
        return {
            "label_body_part": self.body_part,
            "label_view": self.view,
            "label_laterality": self.laterality,
            "label_sex": self.sex,
            "label_age_years": self.age_years,
            "label_age_band": self.age_band,
            "label_sources": dict(self.sources),
            "label_conflicts": list(self.conflicts),
            "has_conflict": self.has_conflict,
            "ruleset_version": ruleset_version,
        }


class RuleSet:
    """A loaded, compiled rule set. `version` = name-version+sha12 of the canonical content."""

    def __init__(self, rules: dict):
        self.rules = rules
        canonical = json.dumps(rules, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        self.sha256 = hashlib.sha256(canonical.encode()).hexdigest()
        name = str(rules.get("name", "rules"))[:32]
        self.name = name
        self.version = f"{name}-{rules.get('version', 1)}+{self.sha256[:12]}"
        self._compile()
        self._cache: dict[tuple, tuple] = {}
        self._age_cache: dict[tuple, tuple] = {}

    # ------------------------------------------------------------ compile
    def _compile(self) -> None:
        r = self.rules
        for key in ("priority", "vocabulary", "tag_values", "text"):
            if not isinstance(r.get(key), dict):
                raise RulesError(f"rules: '{key}' must be a mapping")
        self.vocabulary: dict[str, list[str]] = {k: [str(v) for v in vs] for k, vs in r["vocabulary"].items()}
        for label in ("body_part", "view", "laterality", "sex"):
            if label not in self.vocabulary:
                raise RulesError(f"rules: vocabulary.{label} is missing")
        # the engine's own fallbacks must be vocabulary values (cohort selection relies on it)
        for label, needed in (("laterality", ("NONE", "UNKNOWN")), ("sex", ("UNKNOWN",))):
            for v in needed:
                if v not in self.vocabulary[label]:
                    raise RulesError(f"rules: vocabulary.{label} must include {v}")
        self.priority: dict[str, list[tuple[str, str]]] = {}
        for label, sources in r["priority"].items():
            if label not in ("body_part", "view", "laterality", "sex"):
                raise RulesError(f"rules: priority.{label}: unknown label")
            parsed = []
            for src in sources:
                kind, _, col = str(src).partition(":")
                if kind not in ("tag", "text") or not col:
                    raise RulesError(f"rules: priority.{label}: '{src}' is not tag:<column> or text:<column>")
                parsed.append((kind, col))
            self.priority[label] = parsed
        self.tag_values: dict[str, dict[str, str]] = {}
        for label, mapping in r["tag_values"].items():
            self.tag_values[label] = {_tag_key(k): self._checked(label, v, "tag_values") for k, v in mapping.items()}
        self.text_terms: dict[str, list[tuple[str, str, re.Pattern]]] = {}
        for label, mapping in r["text"].items():
            terms = []
            for value, words in mapping.items():
                self._checked(label, value, "text")
                for w in words:
                    terms.append((str(value), str(w), _term_regex(str(w))))
            self.text_terms[label] = terms
        self.refines: dict[str, set[tuple[str, str]]] = {}
        for label, mapping in (r.get("refines") or {}).items():
            pairs = {(str(s), str(g)) for s, gs in mapping.items() for g in gs}
            changed = True
            while changed:  # transitive closure
                extra = {(a, d) for a, b in pairs for c, d in pairs if b == c} - pairs
                changed = bool(extra)
                pairs |= extra
            self.refines[label] = pairs
        self.frontal_view = {str(k): str(v) for k, v in (r.get("frontal_view") or {}).items()}
        self.unpaired = {str(v) for v in r.get("unpaired") or []}
        bands = r.get("age_bands") or {"width": 10}
        self.band_edges: list[float] | None = None
        self.band_width: int | None = None
        if "edges" in bands:
            edges = sorted(float(e) for e in bands["edges"])
            if not edges:
                raise RulesError("rules: age_bands.edges is empty")
            self.band_edges = edges
        else:
            self.band_width = int(bands.get("width", 10))
            if self.band_width <= 0:
                raise RulesError("rules: age_bands.width must be positive")
        self.age_tolerance = float(r.get("age_tolerance_years", 1.5))

    def _checked(self, label: str, value: Any, where: str) -> str:
        value = str(value)
        if label in self.vocabulary and value not in self.vocabulary[label]:
            raise RulesError(f"rules: {where}.{label}: '{value}' is not in vocabulary.{label}")
        return value

    # ------------------------------------------------------------ helpers
    def age_band(self, age: float | None) -> str | None:
        if age is None:
            return None
        a = math.floor(age)
        if self.band_width:
            lo = a - a % self.band_width
            return f"{lo}-{lo + self.band_width - 1}"
        edges = self.band_edges or []
        if a < edges[0]:
            return None
        for lo, hi in zip(edges, edges[1:]):
            if lo <= a < hi:
                return f"{int(lo)}-{int(hi) - 1}"
        return f"{int(edges[-1])}+"

    def age_bands(self, max_age: int = 110) -> list[str]:
        """All band names (for validating taxonomies)."""
        return sorted({self.age_band(float(a)) for a in range(0, max_age + 1)} - {None},
                      key=lambda b: int(b.split("-")[0].rstrip("+")))

    def age_band_range(self, band: str) -> tuple[float, float | None]:
        """[min, max) years of a band name."""
        if band.endswith("+"):
            return float(band[:-1]), None
        lo, hi = band.split("-")
        return float(lo), float(hi) + 1

    def parse_text(self, label: str, text: Any) -> tuple[str, str] | None:
        """First vocabulary value whose term occurs in the text -> (value, term)."""
        t = normalize_text(text)
        if not t:
            return None
        for value, term, rx in self.text_terms.get(label, ()):
            if rx.search(t):
                return value, term
        return None

    def _refines(self, label: str, specific: str, general: str) -> bool:
        return (specific, general) in self.refines.get(label, ())

    def _observe(self, label: str, fields: dict) -> list[tuple[str, str]]:
        obs = []
        for kind, col in self.priority.get(label, ()):
            raw = fields.get(col)
            if raw is None or raw == "":
                continue
            tag = _TAG_NAMES.get(col, col)
            if kind == "tag":
                v = self.tag_values.get(label, {}).get(_tag_key(raw))
                if v is not None:
                    obs.append((v, f"tag:{tag}"))
            else:
                hit = self.parse_text(label, raw)
                if hit is not None:
                    obs.append((hit[0], f"text:{tag}[{hit[1]}]"))
        return obs

    def _resolve(self, label: str, obs: list[tuple[str, str]]):
        """Highest-priority value, refined by more specific agreeing values; else a conflict."""
        if not obs:
            return None, None, None
        cur_v, cur_s = obs[0]
        conflict = False
        for v, s in obs[1:]:
            if v == cur_v or self._refines(label, cur_v, v):
                continue
            if self._refines(label, v, cur_v):
                cur_v, cur_s = v, s
            else:
                conflict = True
        if conflict:
            # a later refinement must not hide a disagreement with an earlier source
            seen, values = set(), []
            for v, s in obs:
                if (v, s) not in seen:
                    seen.add((v, s))
                    values.append({"value": v, "source": s})
            return obs[0][0], obs[0][1], {"label": label, "values": values}
        return cur_v, cur_s, None

    def _categorical(self, key: tuple) -> tuple:
        fields = dict(zip(_CAT_FIELDS, key))
        values, sources, conflicts = {}, {}, []
        for label in _CATEGORICAL + ("sex",):
            v, s, c = self._resolve(label, self._observe(label, fields))
            values[label], sources[label] = v, s
            if c:
                conflicts.append(c)
        if values["view"] == "FRONTAL" and values["body_part"]:
            bp = values["body_part"]
            resolved = self.frontal_view.get(bp, self.frontal_view.get("default"))
            if resolved:
                values["view"] = resolved
                sources["view"] = f"rule:frontal_view({sources['view']})"
        if values["laterality"] is None:
            if values["body_part"] in self.unpaired:
                values["laterality"], sources["laterality"] = "NONE", "rule:unpaired_body_part"
            else:
                values["laterality"], sources["laterality"] = "UNKNOWN", "rule:no_source"
        if values["sex"] is None:
            values["sex"], sources["sex"] = "UNKNOWN", "rule:no_source"
        return values, {k: v for k, v in sources.items() if v}, conflicts

    def _age(self, fields: dict):
        tag_age = parse_patient_age(fields.get("patient_age"))
        date_age = age_from_dates(fields.get("patient_birth_date"), fields.get("study_date"))
        if tag_age is not None:
            conflict = None
            if date_age is not None and abs(tag_age - date_age) > self.age_tolerance:
                conflict = {"label": "age_years", "values": [
                    {"value": round(tag_age, 2), "source": "tag:PatientAge"},
                    {"value": round(date_age, 2), "source": "rule:birth_date+study_date"}]}
            return tag_age, "tag:PatientAge", conflict
        if date_age is not None:
            return date_age, "rule:birth_date+study_date", None
        return None, None, None


_CAT_FIELDS = ("body_part_examined", "view_position", "image_laterality", "laterality", "patient_sex",
               "series_description", "study_description", "protocol_name", "requested_procedure_description")


def parse_patient_age(value: Any) -> float | None:
    """DICOM AS ('045Y', '006M', '010W', '020D') -> years."""
    if not value:
        return None
    m = _AGE_RE.match(str(value).upper())
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2)
    return {"Y": float(n), "M": n / 12.0, "W": n * 7 / 365.25, "D": n / 365.25}[unit]


def _parse_da(value: Any) -> date | None:
    s = str(value or "").strip().replace(".", "").replace("-", "")
    if len(s) != 8 or not s.isdigit():
        return None
    try:
        return date(int(s[:4]), int(s[4:6]), int(s[6:]))
    except ValueError:
        return None


def age_from_dates(birth: Any, study: Any) -> float | None:
    """Age in years at the study from PatientBirthDate and StudyDate (None if unusable)."""
    b, s = _parse_da(birth), _parse_da(study)
    if b is None or s is None or s < b:
        return None
    years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
    anniversary = _anniversary(b, b.year + years)
    nxt = _anniversary(b, b.year + years + 1)
    return years + (s - anniversary).days / (nxt - anniversary).days


def _anniversary(b: date, year: int) -> date:
    try:
        return b.replace(year=year)
    except ValueError:  # 29 February
        return date(year, 3, 1)


def compute_labels(fields: dict, rules: RuleSet) -> LabelResult:
    """Labels for one index record (keys: the column names of the index tables)."""
    # descriptions and tags repeat across an index: memoize the categorical part and the age
    key = tuple(map(fields.get, _CAT_FIELDS))
    try:
        cached = rules._cache.get(key)
    except TypeError:  # an unhashable value (a multi-valued element): use its text
        key = tuple(None if v is None else str(v) for v in key)
        cached = rules._cache.get(key)
    if cached is None:
        cached = rules._categorical(key)
        if len(rules._cache) > 200_000:
            rules._cache.clear()
        rules._cache[key] = cached
    values, sources, conflicts = cached
    sources = dict(sources)
    conflicts = list(conflicts)
    age_key = (fields.get("patient_age"), fields.get("patient_birth_date"), fields.get("study_date"))
    aged = rules._age_cache.get(age_key)
    if aged is None:
        aged = rules._age(dict(zip(("patient_age", "patient_birth_date", "study_date"), age_key)))
        if len(rules._age_cache) > 200_000:
            rules._age_cache.clear()
        rules._age_cache[age_key] = aged
    age, age_src, age_conflict = aged
    if age is not None:
        sources["age_years"] = age_src
        sources["age_band"] = age_src
    if age_conflict:
        conflicts.append(age_conflict)
    return LabelResult(
        body_part=values["body_part"], view=values["view"], laterality=values["laterality"],
        sex=values["sex"], age_years=None if age is None else round(age, 3),
        age_band=rules.age_band(age), sources=sources, conflicts=conflicts,
    )


def load_rules(path: str | Path | None = None) -> RuleSet:
    """Load a rules file (YAML or JSON); the built-in rules when no path is given."""
    p = Path(path) if path else BUILTIN_RULES
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RulesError(f"cannot read rules file {p}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise RulesError(f"rules file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RulesError(f"rules file {p} must hold a mapping")
    return RuleSet(data)
