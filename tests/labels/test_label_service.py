"""Labels in the database: the labeler through the real index ingest, rule-set versions, relabel."""

from __future__ import annotations

import numpy as np
import yaml
from sqlalchemy import func, select

from app.db.models import Instance, RuleSet as RuleSetRow
from app.index.extract import extract_record
from app.index.ingest import ingest
from app.labels.engine import BUILTIN_RULES
from app.labels.service import get_rules, make_labeler, relabel_all
from app.synth.headers import build_dataset, plan


def _phantom_records(n_per_class: int = 4, error_rate: float = 0.0):
    out = []
    for p in plan("xr10", n_per_class, seed=11, header_error_rate=error_rate):
        ds, _ = build_dataset(p, 11, np.random.default_rng([11, p.index, 1]), (64, 64))
        out.append((p, extract_record(ds, file_path=f"x/{p.index}.dcm")))
    return out


def test_labels_at_ingest_and_relabel_with_a_changed_rules_file(any_ctx, tmp_path):
    recs = _phantom_records()
    with any_ctx.sessions() as s:
        labeler = make_labeler(s, any_ctx.settings.label_rules)
        ingest(s, [r for _, r in recs], labeler=labeler)
        s.commit()
        rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        assert len(rows) == len(recs)
        region_part = {"waters": "SINUS", "sinus_pa": "SINUS", "elbow": "ELBOW", "knee": "KNEE", "chest": "CHEST"}
        for p, r in recs:
            inst = rows[r["sop_instance_uid"]]
            assert inst.ruleset_version == labeler.version
            assert inst.label_body_part == region_part[p.region], (p.region, inst.label_sources)
            assert inst.label_laterality == (p.side or "NONE")
            assert inst.label_sources["body_part"]
            assert inst.has_conflict is False and inst.label_conflicts == []
        # the same rules again: same version, no new rule-set row, and nothing changes, although the
        # phantoms vary PatientSex between a patient's studies like real PACS do (relabel reads each
        # instance's own value, as indexing did)
        by_patient: dict[str, set] = {}
        for _, r in recs:
            by_patient.setdefault(r["patient_id"], set()).add(r["patient_sex"])
        assert any(len(v) > 1 for v in by_patient.values())
        stats = relabel_all(s, any_ctx.settings.label_rules)
        assert stats["changed"] == 0 and stats["version"] == labeler.version
        assert relabel_all(s, any_ctx.settings.label_rules)["changed"] == 0
        assert s.scalar(select(func.count()).select_from(RuleSetRow)) == 1

        # a user rules file (RADCOHORT_LABEL_RULES) with age bands of 20 years: a new version
        data = yaml.safe_load(BUILTIN_RULES.read_text(encoding="utf-8"))
        data["age_bands"] = {"width": 20}
        path = tmp_path / "site-rules.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        stats = relabel_all(s, path)
        s.commit()
        assert stats["version"] != labeler.version and stats["version"] == get_rules(path).version
        assert stats["changed"] > 0
        bands = set(s.scalars(select(Instance.label_age_band).where(Instance.label_age_band.is_not(None))))
        assert bands and all(int(b.split("-")[1]) - int(b.split("-")[0]) == 19 for b in bands)
        versions = set(s.scalars(select(RuleSetRow.version)))
        assert versions == {labeler.version, stats["version"]}
        stored = s.scalar(select(RuleSetRow.rules).where(RuleSetRow.version == stats["version"]))
        assert stored["age_bands"] == {"width": 20}  # the rules as they were, for reproducibility
