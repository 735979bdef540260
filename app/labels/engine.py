"""Pure label engine: index record fields -> normalized labels with provenance and conflicts.

No database, no I/O beyond reading a rules file in `load_rules`. The rules (sources in priority
order, vocabularies with their DICOM PS3.16 / SNOMED CT codes, English/Japanese description terms,
age plausibility) are data: see `rules.yaml` and docs/labels.md.
"""

from __future__ import annotations

import copy
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
LABELS = ("body_part", "view", "laterality", "sex", "age_years", "age_band", "species")
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
    "performed_procedure_step_description": "PerformedProcedureStepDescription",
    "acquisition_device_processing_description": "AcquisitionDeviceProcessingDescription",
    "patient_species_description": "PatientSpeciesDescription",
    "patient_breed_description": "PatientBreedDescription",
}
_SOURCE_KINDS = ("tag", "text")
# PatientAge: DICOM AS ("045Y") or, as research exports write it, a bare number of years ("51", "51.0")
_AGE_RE = re.compile(r"^\s*(\d{1,3}(?:\.\d+)?)\s*([DWMY])?\s*$")
_AGE_UNIT_YEARS = {"Y": 1.0, "M": 1 / 12.0, "W": 7 / 365.25, "D": 1 / 365.25}


class RulesError(ValueError):
    """The rules file is malformed (the message names the offending key)."""


def normalize_text(value: Any) -> str:
    """NFKC (full/half-width folding) + upper case + collapsed whitespace."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
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


def _resolve_code(ref: str) -> tuple[str, str, str]:
    """'CID4031.Knee' or 'SCT.BoneStructureOfScaphoid' -> (scheme, value, meaning), from pydicom's
    copy of DICOM PS3.16 (so a typo or a retired code fails loading instead of reaching a label)."""
    from pydicom.sr.codedict import codes

    group, _, name = str(ref).partition(".")
    try:
        code = getattr(getattr(codes, group), name)
    except AttributeError as exc:
        raise RulesError(f"rules: codes: '{ref}' is not a DICOM PS3.16 concept (CIDnnnn.Name or SCT.Name)") from exc
    return str(code.scheme_designator), str(code.value), str(code.meaning)


@dataclass(frozen=True)
class LabelResult:
    body_part: str | None = None
    view: str | None = None
    laterality: str | None = None
    sex: str | None = None
    age_years: float | None = None
    age_band: str | None = None
    species: str | None = None
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
            "label_species": self.species,
            "label_sources": dict(self.sources),
            "label_conflicts": list(self.conflicts),
            "has_conflict": self.has_conflict,
            "ruleset_version": ruleset_version,
        }


@dataclass(frozen=True)
class _Parsed:
    """What one text says about one label: a value, several (ambiguous), or nothing."""

    value: str | None
    terms: tuple[str, ...] = ()
    ambiguous: tuple[str, ...] = ()


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
            if label not in ("body_part", "view", "laterality", "sex", "species"):
                raise RulesError(f"rules: priority.{label}: unknown label")
            parsed = []
            for src in sources:
                kind, _, col = str(src).partition(":")
                if kind not in _SOURCE_KINDS or not col:
                    raise RulesError(f"rules: priority.{label}: '{src}' is not tag:<column> or text:<column>")
                parsed.append((kind, col))
            self.priority[label] = parsed
        self.tag_values: dict[str, dict[str, str]] = {}
        for label, mapping in r["tag_values"].items():
            self.tag_values[label] = {_tag_key(k): self._checked(label, v, "tag_values") for k, v in mapping.items()}
        self.text_terms: dict[str, list[tuple[str | None, str, re.Pattern]]] = {}
        for label, mapping in r["text"].items():
            terms: list[tuple[str | None, str, re.Pattern]] = []
            for value, words in mapping.items():
                self._checked(label, value, "text")
                for w in words:
                    terms.append((str(value), str(w), _term_regex(str(w))))
            # phrases that contain a term but do not name the value ("TRANS SCAPULAR" view, 手術)
            for w in (r.get("text_ignore") or {}).get(label, ()):
                terms.append((None, str(w), _term_regex(str(w))))
            self.text_terms[label] = terms
        self.multi_view = [re.compile(p) for p in r.get("multi_view_patterns") or []]
        # misspelt long words ("HUMEROUS", "BILATERL") read as the term one edit away
        self.fuzzy_min = int(r.get("fuzzy_min_length", 7) or 0)
        self.fuzzy_terms: dict[str, list[tuple[str, str]]] = {
            label: [(v, normalize_text(w)) for v, w, _ in terms
                    if v is not None and self.fuzzy_min and re.fullmatch(r"[A-Z]+", normalize_text(w))
                    and len(normalize_text(w)) >= self.fuzzy_min]
            for label, terms in self.text_terms.items()}
        self.refines: dict[str, set[tuple[str, str]]] = {}
        for label, mapping in (r.get("refines") or {}).items():
            pairs = {(str(s), str(g)) for s, gs in mapping.items() for g in gs}
            for s, g in pairs:
                self._checked(label, s, "refines")
                self._checked(label, g, "refines")
            changed = True
            while changed:  # transitive closure
                extra = {(a, d) for a, b in pairs for c, d in pairs if b == c} - pairs
                changed = bool(extra)
                pairs |= extra
            self.refines[label] = pairs
        self.combines: dict[str, list[tuple[frozenset, str]]] = {}
        for label, mapping in (r.get("combines") or {}).items():
            self.combines[label] = [(frozenset(self._checked(label, p, "combines") for p in parts),
                                     self._checked(label, v, "combines")) for v, parts in mapping.items()]
        self.codes: dict[str, dict[str, tuple[str, str, str]]] = {}
        for label, mapping in (r.get("codes") or {}).items():
            self.codes[label] = {self._checked(label, v, "codes"): _resolve_code(ref) for v, ref in mapping.items()}
        self.frontal_view = {str(k): str(v) for k, v in (r.get("frontal_view") or {}).items()}
        self.unpaired = {str(v) for v in r.get("unpaired") or []}
        self.human_species = {str(v) for v in (r.get("species") or {}).get("human", ["HUMAN"])}
        self.nonhuman_default = str((r.get("species") or {}).get("nonhuman_default", "NONHUMAN"))
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
        age = r.get("age") or {}
        self.max_age = float(age.get("max_years", 120))
        self.placeholder_birth_dates = {str(d) for d in age.get("placeholder_birth_dates") or []}

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

    def code(self, label: str, value: str | None) -> str | None:
        """'SCT:72696002' for a label value that has a PS3.16 code."""
        c = self.codes.get(label, {}).get(value) if value else None
        return f"{c[0]}:{c[1]}" if c else None

    def code_meaning(self, label: str, value: str) -> str | None:
        c = self.codes.get(label, {}).get(value)
        return c[2] if c else None

    def _refines(self, label: str, specific: str, general: str) -> bool:
        return (specific, general) in self.refines.get(label, ())

    def parse(self, label: str, text: Any) -> _Parsed:
        """Every vocabulary term in the text (longest match first, no overlaps); generals that a
        specific value found next to them refines are dropped; several values left = ambiguous."""
        t = normalize_text(text)
        if not t:
            return _Parsed(None)
        hits = []
        for value, term, rx in self.text_terms.get(label, ()):
            for m in rx.finditer(t):
                hits.append((m.end() - m.start(), m.start(), m.end(), value, term))
        taken: list[tuple[int, int]] = []
        found: dict[str, str] = {}
        spans: dict[str, tuple[int, int]] = {}
        for _, start, end, value, term in sorted(hits, key=lambda h: (-h[0], h[1])):
            if any(start < e and s < end for s, e in taken):
                continue
            taken.append((start, end))
            if value is not None:
                found.setdefault(value, term)
                spans.setdefault(value, (start, end))
        for m in _WORD.finditer(t):
            if len(m.group()) < self.fuzzy_min or any(m.start() < e and s < m.end() for s, e in taken):
                continue
            near = {v: w for v, w in self.fuzzy_terms.get(label, ()) if _one_edit(m.group(), w)}
            if len(near) == 1:  # one reading only: a word near terms of two values stays unread
                (v, w), = near.items()
                found.setdefault(v, f"{m.group()}~{w}")
                spans.setdefault(v, (m.start(), m.end()))
        values = set(found)

        def joined(a: str, b: str) -> bool:
            # views: "AP OBLIQUE" is one view; "正面・両斜位", "PA & OBLIQUE" are two
            (s1, e1), (s2, e2) = sorted((spans[a], spans[b]))
            return label != "view" or not t[e1:s2].strip()

        values = {v for v in values
                  if not any(self._refines(label, o, v) and joined(o, v) for o in values if o != v)}
        for parts, combined in self.combines.get(label, ()):
            if values == parts:
                return _Parsed(combined, tuple(found[p] for p in sorted(parts)))
        multi = label == "view" and any(rx.search(t) for rx in self.multi_view)
        if len(values) == 1 and not multi:
            (v,) = values
            return _Parsed(v, (found[v],))
        if len(values) > 1 or (multi and values):
            return _Parsed(None, ambiguous=tuple(sorted(found[v] for v in values)))
        if multi:
            return _Parsed(None, ambiguous=("several views",))
        return _Parsed(None)

    def parse_text(self, label: str, text: Any) -> tuple[str, str] | None:
        """The one vocabulary value a text names -> (value, term); None when none or several."""
        p = self.parse(label, text)
        return (p.value, p.terms[0]) if p.value else None

    def _observe(self, label: str, fields: dict) -> tuple[list[tuple[str, str]], list[str]]:
        obs, ambiguous = [], []
        for kind, col in self.priority.get(label, ()):
            raw = fields.get(col)
            if raw is None or raw == "":
                continue
            tag = _TAG_NAMES.get(col, col)
            if kind == "tag":
                v = self.tag_values.get(label, {}).get(_tag_key(raw))
                if v is not None:
                    obs.append((v, f"tag:{tag}"))
                continue
            p = self.parse(label, raw)
            if p.value is not None:
                obs.append((p.value, f"text:{tag}[{'+'.join(p.terms)}]"))
            elif p.ambiguous:
                ambiguous.append(f"text:{tag}[{'|'.join(p.ambiguous)}]")
        return obs, ambiguous

    def _resolve(self, label: str, obs: list[tuple[str, str]]):
        """Highest-priority value, refined by more specific agreeing values; else a conflict.

        Returns (value, source, refined_from, conflict); refined_from names the general value and
        its source when a more specific source refined it.
        """
        if not obs:
            return None, None, None, None
        cur_v, cur_s = obs[0]
        refined_from = None
        conflict = False
        for v, s in obs[1:]:
            if v == cur_v or self._refines(label, cur_v, v):
                continue
            if self._refines(label, v, cur_v):
                refined_from = f"{cur_v} from {cur_s}" if refined_from is None else refined_from
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
            return obs[0][0], obs[0][1], None, {"label": label, "values": values}
        return cur_v, cur_s, refined_from, None

    def _species(self, fields: dict) -> tuple[str | None, str | None]:
        """A non-human patient named by PatientSpeciesDescription, breed, or a description term."""
        for col in ("patient_species_description", "patient_breed_description"):
            raw = fields.get(col)
            if not raw:
                continue
            tag = _TAG_NAMES[col]
            v = self.tag_values.get("species", {}).get(_tag_key(raw))
            if v is None:
                p = self.parse("species", raw)
                v = p.value
            if v is not None:
                return v, f"tag:{tag}"
            # any species other than ours, or a breed at all, is an animal of a species we do not list
            return self.nonhuman_default, f"tag:{tag}"
        obs, _ = self._observe("species", fields)
        if obs:
            return obs[0][0], obs[0][1]
        return None, None

    def _categorical(self, key: tuple) -> tuple:
        fields = dict(zip(_CAT_FIELDS, key))
        values, sources, conflicts, ambiguous = {}, {}, [], {}
        for label in _CATEGORICAL + ("sex",):
            obs, amb = self._observe(label, fields)
            v, s, refined_from, c = self._resolve(label, obs)
            values[label], sources[label] = v, s
            if refined_from:
                sources[f"{label}_refines"] = refined_from
            if v is None and amb:
                ambiguous[label] = amb
                sources[label] = "ambiguous:" + "; ".join(amb)
            if c:
                conflicts.append(c)
        if values["view"] == "FRONTAL" and values["body_part"]:
            bp = values["body_part"]
            resolved = self.frontal_view.get(bp, self.frontal_view.get("default"))
            if resolved:
                values["view"] = resolved
                sources["view"] = f"rule:frontal_view({sources['view']})"
        species, species_src = self._species(fields)
        if species is not None:
            sources["species"] = species_src
        if species is not None and species not in self.human_species:
            # veterinary anatomy is not human anatomy: no human body part, so no human class
            if values["body_part"] is not None:
                sources["body_part_anatomy"] = f"{values['body_part']} from {sources['body_part']}"
            values["body_part"] = None
            sources["body_part"] = f"rule:non_human({species})"
            sources.pop("body_part_refines", None)
            conflicts = [c for c in conflicts if c["label"] != "body_part"]
        if values["laterality"] is None:
            if "laterality" in ambiguous:
                values["laterality"] = "UNKNOWN"
            elif values["body_part"] in self.unpaired:
                values["laterality"], sources["laterality"] = "NONE", "rule:unpaired_body_part"
            else:
                values["laterality"], sources["laterality"] = "UNKNOWN", "rule:no_source"
        if values["sex"] is None:
            values["sex"], sources["sex"] = "UNKNOWN", "rule:no_source"
        for label in _CATEGORICAL:
            c = self.code(label, values[label])
            if c:
                sources[f"{label}_code"] = c
        values["species"] = species
        return values, {k: v for k, v in sources.items() if v}, conflicts

    def _age(self, fields: dict):
        """(age, source, conflict, flags): implausible values become unknown, with the reason."""
        flags: list[str] = []
        raw_age = fields.get("patient_age")
        tag_age = parse_patient_age(raw_age)
        if raw_age not in (None, "") and tag_age is None:
            flags.append("PatientAge unreadable")
        if tag_age is not None and not 0 <= tag_age <= self.max_age:
            flags.append(f"PatientAge {tag_age:g} y outside 0-{self.max_age:g}")
            tag_age = None
        date_age, date_flag = self._date_age(fields.get("patient_birth_date"), fields.get("study_date"))
        if date_flag:
            flags.append(date_flag)
        if tag_age == 0 and (date_age is None or date_age >= 1):
            # "000Y" is what many systems write when they do not know the age
            flags.append("PatientAge 0 not confirmed by the birth date")
            tag_age = None
        if tag_age is not None:
            conflict = None
            if date_age is not None and abs(tag_age - date_age) > self.age_tolerance:
                conflict = {"label": "age_years", "values": [
                    {"value": round(tag_age, 2), "source": "tag:PatientAge"},
                    {"value": round(date_age, 2), "source": "rule:birth_date+study_date"}]}
            return tag_age, "tag:PatientAge", conflict, tuple(flags)
        if date_age is not None:
            return date_age, "rule:birth_date+study_date", None, tuple(flags)
        return None, None, None, tuple(flags)

    def _date_age(self, birth: Any, study: Any) -> tuple[float | None, str | None]:
        if not birth:
            return None, None
        b_text = str(birth).strip().replace(".", "").replace("-", "")
        if b_text in self.placeholder_birth_dates:
            return None, "PatientBirthDate is a placeholder"
        b, s = _parse_da(birth), _parse_da(study)
        if b is None:
            return None, "PatientBirthDate is not a valid date"
        if s is None:
            return None, None
        if s < b:
            return None, "PatientBirthDate after StudyDate"
        age = age_from_dates(b, s)
        if age is not None and age > self.max_age:
            return None, f"PatientBirthDate gives {math.floor(age)} y, outside 0-{self.max_age:g}"
        return age, None


_CAT_FIELDS = ("body_part_examined", "view_position", "image_laterality", "laterality", "patient_sex",
               "series_description", "study_description", "protocol_name", "requested_procedure_description",
               "performed_procedure_step_description", "acquisition_device_processing_description",
               "patient_species_description", "patient_breed_description")
# index columns the labeler reads (a bulk relabel selects these)
SOURCE_FIELDS = _CAT_FIELDS + ("patient_age", "patient_birth_date", "study_date")


_WORD = re.compile(r"(?<![A-Z0-9])[A-Z]+(?![A-Z0-9])")


def _one_edit(a: str, b: str) -> bool:
    """a and b differ by one insertion, deletion, substitution or swap of neighbours (not equal)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    i = 0
    while i < len(short) and short[i] == long_[i]:
        i += 1
    return short[i:] == long_[i + 1:]


def parse_patient_age(value: Any) -> float | None:
    """PatientAge in years: DICOM AS ('045Y', '006M', '010W', '020D') or a bare number of years ('51').

    Only parses; plausibility (0-120 years) is the rule set's business (RuleSet._age).
    """
    if value is None or value == "":
        return None
    m = _AGE_RE.match(str(value).upper())
    if not m:
        return None
    return float(m.group(1)) * _AGE_UNIT_YEARS[m.group(2) or "Y"]


def _parse_da(value: Any) -> date | None:
    if isinstance(value, date):
        return value
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
        key = tuple(None if v is None else (" ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
                    for v in key)
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
    try:
        aged = rules._age_cache.get(age_key)
    except TypeError:
        age_key = tuple(None if v is None else str(v) for v in age_key)
        aged = rules._age_cache.get(age_key)
    if aged is None:
        aged = rules._age(dict(zip(("patient_age", "patient_birth_date", "study_date"), age_key)))
        if len(rules._age_cache) > 200_000:
            rules._age_cache.clear()
        rules._age_cache[age_key] = aged
    age, age_src, age_conflict, age_flags = aged
    if age is not None:
        sources["age_years"] = age_src
        sources["age_band"] = age_src
    elif age_flags:
        sources["age_years"] = "flag:" + "; ".join(age_flags)
    if age_flags:
        sources["age_flags"] = "; ".join(age_flags)
    if age_conflict:
        conflicts.append(age_conflict)
    return LabelResult(
        body_part=values["body_part"], view=values["view"], laterality=values["laterality"],
        sex=values["sex"], age_years=None if age is None else round(age, 3),
        age_band=rules.age_band(age), species=values["species"], sources=sources, conflicts=conflicts,
    )


def plausible_age_years(patient_age: Any, birth_date: Any = None, study_date: Any = None,
                        rules: RuleSet | None = None) -> float | None:
    """The age the labeler would give (None when implausible), for listings that show an age:
    PatientAge as given, an age from the dates in whole years (as listings always showed it)."""
    rules = rules or _builtin()
    age, src, _, _ = rules._age({"patient_age": patient_age, "patient_birth_date": birth_date,
                                 "study_date": study_date})
    if age is None:
        return None
    return round(age, 3) if src == "tag:PatientAge" else float(math.floor(age))


_BUILTIN: list[RuleSet] = []


def _builtin() -> RuleSet:
    if not _BUILTIN:
        _BUILTIN.append(load_rules())
    return _BUILTIN[0]


# ----------------------------------------------------------------------------- loading and overlays
def merge_overlay(base: dict, overlay: dict) -> dict:
    """The built-in rules plus a site overlay: terms and tag values are added, nothing is removed.

    Lists are extended (without duplicates), mappings merged key by key; `name`/`version` of the
    overlay name the result (so its version differs from the built-in one).
    """
    out = copy.deepcopy(base)

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            elif isinstance(v, list) and isinstance(dst.get(k), list):
                dst[k] = dst[k] + [x for x in v if x not in dst[k]]
            else:
                dst[k] = copy.deepcopy(v)

    merge(out, {k: v for k, v in overlay.items() if k != "extends"})
    out["name"] = str(overlay.get("name") or f"{base.get('name', 'builtin')}+site")
    return out


def load_rules(path: str | Path | None = None) -> RuleSet:
    """Load a rules file (YAML or JSON); the built-in rules when no path is given.

    A file with `extends: builtin` is a site overlay (validated, line-level errors; see
    app.labels.overlay): its terms are added to the built-in rules.
    """
    p = Path(path) if path else BUILTIN_RULES
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"cannot read rules file {p}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"rules file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RulesError(f"rules file {p} must hold a mapping")
    if data.get("extends") is not None:
        from app.labels.overlay import apply_overlay_text

        return apply_overlay_text(text, str(p))
    return RuleSet(data)
