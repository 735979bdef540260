"""Pull to quota: the C-FIND queries that find a taxonomy's candidates on a PACS.

PACS such as Orthanc index PatientSex, PatientBirthDate, BodyPartExamined, Modality and StudyDate
but not PatientAge, ViewPosition or Laterality, so an age range becomes a birth-date range for
the study-date window, and view / laterality are left for the labeler after retrieval
(`post_filter`). Pure: no network, no database.

Each planned query also carries `verify`: every matching value the class needs. The runner checks
each C-FIND answer against it on our side (app.dicom.matching) before anything is retrieved, so a
PACS that ignores a key cannot make us fetch unrelated images. Keys the node's probe found not
honoured (or refused) at SERIES level are not sent as matching keys at all, only asked for as return
keys (`not_sent`): matching them is then our side's job alone.
"""

from __future__ import annotations

from datetime import date, timedelta

from app.labels.engine import RuleSet

# labels a PACS query cannot express; checked on the retrieved headers instead
POST_FILTER = ("view", "laterality")


def _da(value: str | date) -> date:
    if isinstance(value, date):
        return value
    s = value.strip().replace("-", "")
    return date(int(s[:4]), int(s[4:6]), int(s[6:8]))


def _fmt(d: date) -> str:
    return d.strftime("%Y%m%d")


def _years_before(d: date, years: int) -> date:
    try:
        return d.replace(year=d.year - years)
    except ValueError:  # 29 February
        return d.replace(year=d.year - years, day=28)


def parse_date_range(study_date_range: str | tuple) -> tuple[date, date]:
    """'20110101-20161231' or (start, end) -> (start, end) dates."""
    if isinstance(study_date_range, str):
        lo, sep, hi = study_date_range.partition("-") if len(study_date_range) == 17 else ("", "", "")
        if not sep:
            raise ValueError("study_date_range must be 'YYYYMMDD-YYYYMMDD'")
        start, end = _da(lo), _da(hi)
    else:
        start, end = (_da(x) for x in study_date_range)
    if start > end:
        raise ValueError("study_date_range starts after it ends")
    return start, end


def birth_date_range(age_min: float | None, age_max_exclusive: float | None, start: date, end: date) -> str | None:
    """Birth dates of everyone aged [age_min, age_max_exclusive) on some day in [start, end]."""
    if age_min is None and age_max_exclusive is None:
        return None
    # youngest allowed: age_min on the last study day; oldest: just under age_max on the first day
    latest = _years_before(end, int(age_min)) if age_min is not None else None
    earliest = (_years_before(start, int(age_max_exclusive)) + timedelta(days=1)
                if age_max_exclusive is not None else None)
    return f"{_fmt(earliest) if earliest else ''}-{_fmt(latest) if latest else ''}"


def _age_window(where: dict, rules: RuleSet | None) -> tuple[float | None, float | None]:
    lo = hi = None
    if "age_years" in where:
        v = where["age_years"]
        rng = v if isinstance(v, dict) else {"min": v, "max": v}
        lo = rng.get("min")
        hi = int(rng["max"]) + 1 if rng.get("max") is not None else None
    if "age_band" in where and rules is not None:
        bands = where["age_band"] if isinstance(where["age_band"], list) else [where["age_band"]]
        ranges = [rules.age_band_range(b) for b in bands]
        blo = min(r[0] for r in ranges)
        bhi = None if any(r[1] is None for r in ranges) else max(r[1] for r in ranges)
        lo = blo if lo is None else max(lo, blo)
        hi = bhi if hi is None else (hi if bhi is None else min(hi, bhi))
    return lo, hi


def _as_list(v) -> list:
    return v if isinstance(v, list) else [v]


def keys_to_withhold(capabilities: dict | None, level: str = "SERIES") -> set[str]:
    """Matching keys not to send at `level`: those the node's probe found ignored or refused.
    A node never probed gets every key (its answers are verified on our side all the same)."""
    caps = capabilities or {}
    out: set[str] = set()
    for field in ("keys_not_honoured", "keys_refused"):
        out |= set((caps.get(field) or {}).get(level, []))
    return out


def plan_queries(taxonomy: dict, study_date_range: str | tuple, rules: RuleSet | None = None,
                 capabilities: dict | None = None) -> list[dict]:
    """One SERIES-level C-FIND per class x modality x BodyPartExamined value.

    Returns [{"class", "level", "query": {DICOM keyword: value}, "verify": {keyword: value},
    "not_sent": [keyword], "post_filter": {label: value}}]: `query` is what is sent, `verify` what
    every answer must match on our side (`capabilities`: the node's probe findings).
    With `rules`, each body part expands to every header value the rules map to it or to a more
    general part it refines (SINUS -> SINUS, PNS, ..., SKULL, HEAD), and the body part joins the
    post filter; without, the label value itself is queried.
    """
    start, end = parse_date_range(study_date_range)
    withheld = keys_to_withhold(capabilities)
    tag_values: dict[str, list[str]] = {}
    if rules is not None:
        for raw, value in rules.rules.get("tag_values", {}).get("body_part", {}).items():
            tag_values.setdefault(str(value), []).append(str(raw))
    out: list[dict] = []
    for cls in taxonomy["classes"]:
        where = cls["where"]
        base: dict[str, str] = {"StudyDate": f"{_fmt(start)}-{_fmt(end)}", "PatientID": "", "StudyInstanceUID": "",
                                "SeriesInstanceUID": ""}
        if "sex" in where:
            sexes = [s for s in _as_list(where["sex"]) if s in ("M", "F", "O")]
            if len(sexes) == 1:
                base["PatientSex"] = sexes[0]
        lo, hi = _age_window(where, rules)
        births = birth_date_range(lo, hi, start, end)
        if births:
            base["PatientBirthDate"] = births
        modalities = _as_list(where.get("modality", [""]))
        parts: list[str] = []
        for bp in _as_list(where.get("body_part", [])):
            # headers often carry a more general part (a Waters view tagged SKULL, an elbow ARM):
            # query those too and let the labeler decide after retrieval
            general = sorted(g for s, g in (rules.refines.get("body_part", ()) if rules else ()) if s == bp)
            for value in [bp, *general]:
                parts += [v for v in [value, *sorted(set(tag_values.get(value, [])) - {value})] if v not in parts]
        post = {k: where[k] for k in POST_FILTER if k in where}
        if len(parts) > 1 or (parts and parts[0] != where.get("body_part")):
            post["body_part"] = where["body_part"]
        for modality in modalities:
            for part in parts or [""]:
                q = dict(base)
                if modality:
                    q["Modality"] = modality
                if part:
                    q["BodyPartExamined"] = part
                verify = {k: v for k, v in q.items() if v}
                not_sent = sorted(k for k in verify if k in withheld)
                for k in not_sent:
                    q[k] = ""  # still asked for as a return key, so the answer can be checked
                out.append({"class": cls["name"], "level": "SERIES", "query": q, "verify": verify,
                            "not_sent": not_sent, "post_filter": post})
    return out
