"""Labels in the database: versioned rule sets, the per-record labeler used at indexing, bulk relabel."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Instance, Patient, RuleSet as RuleSetRow, Series, Study
from app.labels.engine import RuleSet, compute_labels, load_rules

log = logging.getLogger("radcohort.labels")

LABEL_COLUMNS = ("label_body_part", "label_view", "label_laterality", "label_sex", "label_age_years",
                 "label_age_band", "label_species", "label_sources", "label_conflicts", "has_conflict")

_loaded: dict[tuple[str, float], RuleSet] = {}


def get_rules(rules_file: str | Path | None = None) -> RuleSet:
    """The rule set from a file (built-in when None), reloaded when the file changes."""
    from app.labels.engine import BUILTIN_RULES

    p = Path(rules_file) if rules_file else BUILTIN_RULES
    try:
        key = (str(p.resolve()), p.stat().st_mtime)
    except OSError:
        key = (str(p), 0.0)
    rs = _loaded.get(key)
    if rs is None:
        rs = load_rules(p)
        _loaded.clear()  # keep one: a changed file replaces the old version
        _loaded[key] = rs
    return rs


def ensure_ruleset(session: Session, rules: RuleSet) -> str:
    """Record the rule set (version = name-version+sha12) once; returns the version."""
    if session.scalar(select(RuleSetRow.id).where(RuleSetRow.version == rules.version)) is None:
        try:
            with session.begin_nested():
                session.add(RuleSetRow(version=rules.version, sha256=rules.sha256, rules=rules.rules))
        except IntegrityError:  # another process recorded it first
            pass
    return rules.version


def make_labeler(session: Session, rules_file: str | Path | None = None,
                 rules: RuleSet | None = None) -> Callable[[dict], dict]:
    """A function index record -> `instances` label columns (label_*, has_conflict, ruleset_version).

    Pass `settings.label_rules` as `rules_file` to use a user rules file. The rule set is recorded
    in the `rulesets` table (flushed, committed with the caller's unit of work).
    """
    rules = rules or get_rules(rules_file)
    version = ensure_ruleset(session, rules)

    def labeler(fields: dict) -> dict:
        return compute_labels(fields, rules).as_columns(version)

    labeler.rules = rules  # type: ignore[attr-defined]
    labeler.version = version  # type: ignore[attr-defined]
    return labeler


def _fields_query():
    i, se, st, p = Instance.__table__.c, Series.__table__.c, Study.__table__.c, Patient.__table__.c
    cols = [
        i.id, i.modality, i.view_position, i.image_laterality, i.photometric_interpretation, i.sop_class_uid,
        i.acquisition_device_processing_description,
        se.body_part_examined, se.laterality, se.series_description, se.protocol_name,
        se.performed_procedure_step_description,
        st.study_date, st.study_description, st.requested_procedure_description, st.patient_age,
        i.patient_sex, p.patient_birth_date, p.patient_species_description, p.patient_breed_description,
        *[i[c] for c in LABEL_COLUMNS],
    ]
    return (select(*cols).select_from(Instance.__table__.join(Series.__table__, i.series_pk == se.id)
                                      .join(Study.__table__, i.study_pk == st.id)
                                      .join(Patient.__table__, i.patient_pk == p.id)))


def relabel_all(session: Session, rules_file: str | Path | None = None, rules: RuleSet | None = None,
                batch_size: int = 10_000, progress: Callable[[int], Any] | None = None) -> dict:
    """Recompute the labels of every indexed instance with the current rule set.

    Reads the index in id-keyed batches and writes only rows whose labels changed: one executemany
    per batch (SQLite) or COPY into a temporary table and one UPDATE ... FROM (PostgreSQL, where
    row-by-row UPDATEs ran at a quarter of the speed); then stamps the new version on all rows in
    one statement. Flushes only: the caller commits. Returns {"version", "scanned", "changed", "seconds"}.
    """
    t0 = time.perf_counter()
    labeler = make_labeler(session, rules_file=rules_file, rules=rules)
    version = labeler.version  # type: ignore[attr-defined]
    table = Instance.__table__
    conn = session.connection()
    dialect = conn.dialect
    ph = (lambda n: "?") if dialect.paramstyle == "qmark" else (lambda n: "%s")
    sets = ", ".join(f"{c} = {ph(c)}" for c in LABEL_COLUMNS)
    update_sql = f"UPDATE instances SET {sets} WHERE id = {ph('id')}"
    json_cols = {"label_sources", "label_conflicts"}
    q = _fields_query()
    names = [c.name for c in q.selected_columns]
    last_id, scanned, changed = 0, 0, 0
    dumped: dict = {}  # JSON text per distinct sources/conflicts value: they repeat across rows
    pg = dialect.name == "postgresql"
    cur = conn.connection.dbapi_connection.cursor()
    try:
        if pg:
            cur.execute("DROP TABLE IF EXISTS relabel_tmp")
            cur.execute("CREATE TEMP TABLE relabel_tmp (label_body_part varchar, label_view varchar, "
                        "label_laterality varchar, label_sex varchar, label_age_years double precision, "
                        "label_age_band varchar, label_species varchar, label_sources json, label_conflicts json, has_conflict boolean, "
                        "id integer PRIMARY KEY) ON COMMIT DROP")
        while True:
            stmt = q.where(table.c.id > last_id).order_by(table.c.id).limit(batch_size)
            rows = [dict(zip(names, r)) for r in _raw(conn, stmt, cur)]
            if not rows:
                break
            params = []
            for row in rows:
                new = labeler(row)
                old_sources, old_conflicts = row["label_sources"], row["label_conflicts"]
                if isinstance(old_sources, str):  # raw JSON text from the DBAPI
                    old_sources, old_conflicts = json.loads(old_sources), json.loads(old_conflicts or "null")
                if any(new[c] != row[c] for c in LABEL_COLUMNS if c not in json_cols) or \
                        new["label_sources"] != old_sources or new["label_conflicts"] != old_conflicts:
                    params.append(tuple(_dump(new[c], dumped) if c in json_cols else new[c]
                                        for c in LABEL_COLUMNS) + (row["id"],))
            if params and pg:
                with cur.copy(f"COPY relabel_tmp ({', '.join(LABEL_COLUMNS)}, id) FROM STDIN") as copy:
                    for p in params:
                        copy.write_row(p)
            elif params:
                cur.executemany(update_sql, params)
            scanned += len(rows)
            changed += len(params)
            last_id = rows[-1]["id"]
            if progress:
                progress(scanned)
        if pg:
            if changed:
                sets_from = ", ".join(f"{c} = t.{c}" for c in LABEL_COLUMNS)
                cur.execute(f"UPDATE instances AS i SET {sets_from} FROM relabel_tmp AS t WHERE i.id = t.id")
            cur.execute("DROP TABLE relabel_tmp")
    finally:
        cur.close()
    conn.execute(update(table).where(or_(table.c.ruleset_version.is_(None), table.c.ruleset_version != version))
                 .values(ruleset_version=version))
    seconds = time.perf_counter() - t0
    log.info("relabel %s: %d scanned, %d changed in %.1f s", version, scanned, changed, seconds)
    return {"version": version, "scanned": scanned, "changed": changed, "seconds": round(seconds, 3)}


def _dump(value, memo: dict) -> str:
    if not value:
        return "[]" if isinstance(value, list) else "{}"
    key = tuple(value.items()) if isinstance(value, dict) else json.dumps(value, ensure_ascii=False)
    text = memo.get(key)
    if text is None:
        text = key if isinstance(key, str) else json.dumps(value, ensure_ascii=False)
        if len(memo) > 100_000:
            memo.clear()
        memo[key] = text
    return text


def _raw(conn, stmt, cur) -> list[tuple]:
    compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    params = compiled.construct_params()
    cur.execute(str(compiled), tuple(params[k] for k in compiled.positiontup) if compiled.positional else params)
    return cur.fetchall()


def load_labeler(sessions, rules_file: str | Path | None = None) -> Callable[[dict], dict] | None:
    """The labeler handed to the index writer (the SCP's sink, reindex), its rule set recorded; None
    when the rule set cannot be loaded or recorded (the index then goes on without labels: they can
    be recomputed with `radcohort labels relabel`)."""
    last: Exception | None = None
    for _ in range(3):  # several SCP processes may register the same rule set at once
        session = sessions()
        try:
            labeler = make_labeler(session, rules_file)
            session.commit()
            return labeler
        except Exception as exc:  # noqa: BLE001 - index without labels rather than refuse data
            session.rollback()
            last = exc
            time.sleep(0.2)
        finally:
            session.close()
    log.warning("labeler unavailable, indexing without labels: %s", last)
    return None
