"""The cohort builder on SQLite and PostgreSQL: one image per patient, two-class exclusion, exclusion
report, seeded quotas, patient-level split, frozen snapshots, pseudonymous manifests."""

from __future__ import annotations

import csv
import io

import pytest
import yaml
from sqlalchemy import func, select

from app.cohorts.builder import split_counts
from app.cohorts.service import cohort_items, create_cohort, get_cohort, manifest_csv, patient_key
from app.db.models import AuditEvent, Cohort, CohortMember, Instance, RuleSet as RuleSetRow
from app.errors import InvalidInput, NotFound
from app.cohorts.taxonomies import create_taxonomy
from app.labels.engine import BUILTIN_RULES, RuleSet, load_rules
from app.labels.service import relabel_all

KEY = b"k1"


def _create(ctx, **params):
    params = {"taxonomy": "xr10", **params}
    with ctx.sessions() as s:
        out = create_cohort(s, params, pseudonym_key=params.pop("_key", KEY), store_dir=ctx.settings.store_dir,
                            actor="test")
        s.commit()
    return out


def _by_class(out):
    return {c["name"]: c for c in out["classes"]}


def _members(ctx, cohort_id):
    with ctx.sessions() as s:
        t = CohortMember.__table__
        return s.execute(select(t.c.sop_instance_uid, t.c.class_name, t.c.split, t.c.patient_key)
                         .where(t.c.cohort_id == cohort_id).order_by(t.c.sop_instance_uid)).all()


def test_exclusion_report_and_one_image_per_patient(any_ctx, index):
    out = _create(any_ctx)
    assert out["excluded"] == {"no_label": 1, "incomplete_label": 0, "not_an_image": 1, "unsupported_photometric": 1,
                               "conflicting_labels": 1, "patient_in_two_classes": 2, "duplicate_patient": 1,
                               "file_missing": 1}
    c = _by_class(out)
    assert (c["LtK"]["available"], c["LtK"]["selected"]) == (13, 13)  # 12 + one of DUP's two knees
    assert (c["RtK"]["available"], c["RtK"]["selected"]) == (14, 13)  # 12 + alias + MISS (file gone)
    assert c["C20F"]["selected"] == 12 and c["C60M"]["selected"] == 12 and c["W"]["selected"] == 0
    members = _members(any_ctx, out["id"])
    uids = {m.sop_instance_uid for m in members}
    assert not uids & {index[k] for k in ("two_l", "two_r", "conflict", "rgb", "no_pixels", "no_label", "missing")}
    assert len(uids & {index["dup_a"], index["dup_b"]}) == 1
    keys = [m.patient_key for m in members]
    assert len(keys) == len(set(keys)) == out["size"] == 50  # no patient twice
    for cls in c.values():  # split sizes add up, test rounded from 20 %
        assert cls["train"] + cls["val"] + cls["test"] == cls["selected"]
        assert cls["test"] == round(cls["selected"] * 0.2)


def test_conflicts_can_be_admitted_and_identities_merged(any_ctx, index):
    out = _create(any_ctx, include_conflicts=True, check_files=False)
    assert out["excluded"]["conflicting_labels"] == 0
    assert _by_class(out)["RtK"]["available"] == 15  # the conflicting knee is labelled R (tag first)
    out = _create(any_ctx, match_name_birthdate=True, preview=True)
    # LK0 and LK0-NEW are one person (same name + birth date) with a left and a right knee
    assert out["excluded"]["patient_in_two_classes"] == 4
    assert _by_class(out)["LtK"]["available"] == 12


def test_patient_level_split_and_seeds(any_ctx, index):
    params = {"per_class": 8, "split": {"train": 0.5, "val": 0.25, "test": 0.25}, "check_files": False}
    a, b, c = _create(any_ctx, seed=1, **params), _create(any_ctx, seed=1, **params), _create(any_ctx, seed=2,
                                                                                             **params)
    ma, mb, mc = _members(any_ctx, a["id"]), _members(any_ctx, b["id"]), _members(any_ctx, c["id"])
    assert ma == mb  # same seed -> same cohort, same split
    assert {m.sop_instance_uid for m in ma} != {m.sop_instance_uid for m in mc}
    sides: dict[str, set] = {}
    for m in ma:
        sides.setdefault(m.patient_key, set()).add(m.split)
    assert len(sides) > 1 and all(len(s) == 1 for s in sides.values())  # no patient on two sides
    for cls in a["classes"]:
        if cls["available"] >= 8:
            assert (cls["selected"], cls["train"], cls["val"], cls["test"]) == (8, 4, 2, 2)


def test_balanced_quota(any_ctx, index):
    with any_ctx.sessions() as s:
        create_taxonomy(s, {"name": "three", "classes": [
            {"name": "L", "where": {"body_part": "KNEE", "laterality": "L"}},
            {"name": "R", "where": {"body_part": "KNEE", "laterality": "R"}},
            {"name": "F", "where": {"body_part": "CHEST", "sex": "F", "age_years": {"min": 20, "max": 29}}}]},
            load_rules())
        s.commit()
    out = _create(any_ctx, taxonomy="three", preview=True, check_files=False)
    assert [c["available"] for c in out["classes"]] == [13, 14, 12]  # R: 12 + alias + MISS (CONF conflicts)
    out = _create(any_ctx, taxonomy="three", balanced=True, preview=True, check_files=False)
    assert [c["selected"] for c in out["classes"]] == [12, 12, 12]  # the smallest class sets the size
    out = _create(any_ctx, taxonomy="three", balanced=True, per_class=5, preview=True, check_files=False)
    assert [c["selected"] for c in out["classes"]] == [5, 5, 5]
    with any_ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Cohort)) == 0


def test_preview_saves_nothing_and_empty_cohort_is_refused(any_ctx, index):
    out = _create(any_ctx, preview=True)
    assert out["id"] is None and out["size"] == 50
    with any_ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Cohort)) == 0
        assert s.scalar(select(func.count()).select_from(CohortMember)) == 0
        create_taxonomy(s, {"name": "elbows", "classes": [{"name": "E", "where": {"body_part": "ELBOW"}}]},
                        load_rules())
        with pytest.raises(InvalidInput, match="nothing saved"):
            create_cohort(s, {"taxonomy": "elbows"}, pseudonym_key=KEY, store_dir=None)
        assert s.scalar(select(func.count()).select_from(Cohort)) == 0


def test_manifest_is_pseudonymous_and_keyed(any_ctx, index):
    a = _create(any_ctx, check_files=False)
    b = _create(any_ctx, check_files=False, _key=b"another-deployment")
    with any_ctx.sessions() as s:
        text_a = manifest_csv(s, a["id"])
        text_b = manifest_csv(s, b["id"])
        rows_a = list(csv.DictReader(io.StringIO(text_a)))
        assert list(rows_a[0]) == ["sop_instance_uid", "class", "split", "patient_key"]
        assert len(rows_a) == a["size"]
        for secret in ("LK1", "RK1", "CF1", "LEFT^KNEE1", "KNEE1", "CHEST^F1"):
            assert secret not in text_a
        # stable per key, different across keys
        lk1 = patient_key(KEY, "LK1", "")
        assert lk1 in text_a and lk1 not in text_b
        assert patient_key(b"another-deployment", "LK1", "") in text_b
        assert patient_key(KEY, "LK1", "") == lk1 != patient_key(KEY, "LK1", "OTHER-ISSUER")
        items = cohort_items(s, a["id"])
        assert len(items) == a["size"] and set(items[0]) == {"sop_instance_uid", "class_name", "split", "file_path"}
        assert all(i["file_path"] for i in items)
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "cohort.create")).all()
        assert len(ev) == 2 and ev[0].target == f"cohort:{a['id']}"
        with pytest.raises(NotFound):
            manifest_csv(s, 9999)


def test_changed_rules_new_version_old_cohort_frozen(any_ctx, index, tmp_path):
    old = _create(any_ctx, check_files=False)
    before = _members(any_ctx, old["id"])
    # a changed rule set: laterality only from the series description (the tags are ignored)
    data = yaml.safe_load(BUILTIN_RULES.read_text(encoding="utf-8"))
    data["priority"]["laterality"] = ["text:series_description"]  # ignore the laterality tags
    new_rules = RuleSet(data)
    with any_ctx.sessions() as s:
        stats = relabel_all(s, rules=new_rules, batch_size=7)
        s.commit()
        assert stats["version"] == new_rules.version != old["ruleset_version"]
        assert stats["scanned"] == s.scalar(select(func.count()).select_from(Instance))
        assert stats["changed"] > 0
        assert set(s.scalars(select(Instance.ruleset_version))) == {new_rules.version}
        assert s.scalar(select(func.count()).select_from(RuleSetRow)) == 2
        stats2 = relabel_all(s, rules=new_rules)
        assert stats2["changed"] == 0  # idempotent
        s.commit()
    new = _create(any_ctx, check_files=False)
    assert new["ruleset_version"] == new_rules.version
    # knees lost their side, except the former conflict whose description says 左 (now unopposed)
    assert _by_class(new)["LtK"]["available"] == 1 and _by_class(new)["RtK"]["available"] == 0
    assert _members(any_ctx, old["id"]) == before  # the old snapshot is untouched
    with any_ctx.sessions() as s:
        got = get_cohort(s, old["id"])
        assert got["ruleset_version"] == old["ruleset_version"]
        assert got["taxonomy_definition"]["classes"][4]["name"] == "LtK"


@pytest.mark.parametrize("n, fr, expected", [
    (10, {"train": 0.8, "test": 0.2}, {"train": 8, "test": 2}),
    (1, {"train": 0.8, "test": 0.2}, {"train": 1, "test": 0}),
    (3, {"train": 0.0, "val": 0.5, "test": 0.5}, {"train": 0, "val": 1, "test": 2}),
    (5, {"test": 1.0}, {"test": 5}),
])
def test_split_counts(n, fr, expected):
    got = split_counts(n, fr)
    assert sum(got.values()) == n
    assert got == expected


def test_overlapping_classes_and_index_hints_give_exact_counts(any_ctx, index):
    from app.cohorts.builder import CohortSpec, build, classes_disjoint

    overlapping = {"name": "o", "classes": [{"name": "knee", "where": {"body_part": "KNEE"}},
                                            {"name": "left", "where": {"body_part": "KNEE", "laterality": "L"}}]}
    assert not classes_disjoint(overlapping["classes"])
    from app.cohorts.taxonomies import presets

    assert classes_disjoint(presets()["xr10"]["classes"]) and classes_disjoint(presets()["xr5"]["classes"])
    spec = CohortSpec(check_files=False)
    with any_ctx.sessions() as s:
        r = build(s, overlapping, spec)
        # a left knee matches both classes, so its patient is in two classes; each instance of
        # those patients counts once (LK0-11, DUP's two left knees, TWO's left and right knee)
        assert r.excluded["patient_in_two_classes"] == 12 + 2 + 2
        assert r.excluded["unsupported_photometric"] == 1 and r.excluded["not_an_image"] == 1
        vocab = load_rules().vocabulary
        for tax in (presets()["xr10"], presets()["xr5"]):
            plain = build(s, tax, spec)
            hinted = build(s, tax, spec, vocabulary=vocab)
            assert plain.members == hinted.members and plain.excluded == hinted.excluded


def test_incomplete_labels_are_reported_per_class_and_once_in_total(any_ctx):
    """Instances whose known labels fit a class but a label it needs is unknown: counted for every
    class they could belong to, once in the exclusion report, never when a class takes them."""
    from app.labels.service import make_labeler
    from tests.factories.index_rows import add_index_rows
    from tests.cohorts.cohort_index import chest, knee

    recs = [knee(f"K{i}", "L") for i in range(3)] + [chest(f"C{i}", "F", 25) for i in range(3)]
    recs += [knee(f"NOSIDE{i}", None) for i in range(4)]  # laterality unknown: LtK or RtK
    recs += [knee("NOVIEW", "R", view_position=None, series_description="KNEE")]  # view unknown: RtK
    recs += [chest(f"NOSEX{i}", "", 25) for i in range(2)]  # sex unknown, 25: C20F or C20M
    recs += [chest("NOAGE", "M", 0, patient_age=None)]  # age unknown, male: C20M or C60M
    recs += [chest("OLD", "", 45)]  # sex unknown but 45: no xr10 class in any case
    recs += [{"patient_id": "NOBODY", "series_description": "XR"}]  # no body part: no_label, not this
    with any_ctx.sessions() as s:
        add_index_rows(s, recs, make_labeler(s))
        s.commit()
    out = _create(any_ctx, check_files=False)
    c = _by_class(out)
    assert out["excluded"]["incomplete_label"] == 4 + 1 + 2 + 1
    assert out["excluded"]["no_label"] == 1
    assert {k: c[k]["incomplete_label"] for k in ("LtK", "RtK", "C20F", "C20M", "C60F", "C60M", "W")} == \
        {"LtK": 4, "RtK": 5, "C20F": 2, "C20M": 3, "C60F": 0, "C60M": 1, "W": 0}
    assert (c["LtK"]["selected"], c["C20F"]["selected"]) == (3, 3)  # the complete ones are in

    # xr5's knee class needs no side: the side-less knees are in it, not incomplete
    out5 = _create(any_ctx, taxonomy="xr5", check_files=False)
    c5 = _by_class(out5)
    assert c5["K"]["selected"] == 3 + 4 and c5["K"]["incomplete_label"] == 1  # only the view-less knee
    assert out5["excluded"]["incomplete_label"] == 1

    # a user taxonomy where one class takes what another would need a label for
    with any_ctx.sessions() as s:
        create_taxonomy(s, {"name": "knees", "classes": [
            {"name": "left", "where": {"body_part": "KNEE", "view": "AP", "laterality": "L"}},
            {"name": "any_knee_unknown_side", "where": {"body_part": "KNEE", "laterality": "UNKNOWN"}}]}, load_rules())
        s.commit()
    ck = _by_class(_create(any_ctx, taxonomy="knees", check_files=False))
    assert ck["left"]["incomplete_label"] == 0  # the side-less knees are in the other class
    assert ck["any_knee_unknown_side"]["selected"] == 4


def _saved(ctx, cohort_id):
    """The saved members in insertion order with what the index says about each instance."""
    from app.db.models import Patient

    with ctx.sessions() as s:
        m, i, p = CohortMember.__table__, Instance.__table__, Patient.__table__
        return s.execute(select(m.c.instance_pk, m.c.sop_instance_uid, m.c.file_path, m.c.class_name, m.c.split,
                                m.c.patient_key, i.c.sop_instance_uid, i.c.file_path, p.c.patient_id, p.c.issuer)
                         .join_from(m, i, i.c.id == m.c.instance_pk).join(p, p.c.id == i.c.patient_pk)
                         .where(m.c.cohort_id == cohort_id).order_by(m.c.id)).all()


def test_saved_members_are_the_selection_in_order_with_their_uids_paths_and_pseudonyms(any_ctx, index):
    """The members are written inside the database (INSERT ... SELECT): each row carries its own
    instance's UID and path and the HMAC of its own patient's issuer-qualified ID, in the builder's order."""
    from app.cohorts.builder import CohortSpec, build
    from app.cohorts.taxonomies import presets
    from app.labels.service import make_labeler
    from tests.factories.index_rows import add_index_rows
    from tests.cohorts.cohort_index import knee

    with any_ctx.sessions() as s:  # the same PatientID under another issuer is another patient
        add_index_rows(s, [knee("LK1", "L", issuer="HOSP-B"), knee("ISS2", "R", issuer="HOSP-B")], make_labeler(s))
        s.commit()
    params = {"per_class": 9, "split": {"train": 0.6, "val": 0.2, "test": 0.2}, "seed": 3, "check_files": False}
    out = _create(any_ctx, **params)
    rows = _saved(any_ctx, out["id"])
    assert len(rows) == out["size"] > 30
    for iid, uid, path, cls, split, key, idx_uid, idx_path, pid, issuer in rows:
        assert (uid, path) == (idx_uid, idx_path)
        assert key == patient_key(KEY, pid, issuer)
    assert any(issuer == "HOSP-B" for *_, issuer in rows)
    with any_ctx.sessions() as s:
        spec = CohortSpec(**{k: v for k, v in params.items()})
        again = build(s, presets()["xr10"], spec, vocabulary=load_rules().vocabulary)
        cohort = s.get(Cohort, out["id"])
        assert cohort.summary["ruleset_versions"] == {load_rules().version: out["size"]}
        assert cohort.ruleset_version == out["ruleset_version"] == load_rules().version
    assert [(r[0], r[3], r[4]) for r in rows] == [(m["instance_pk"], m["class_name"], m["split"])
                                                  for m in again.members]
    items = None
    with any_ctx.sessions() as s:
        items = cohort_items(s, out["id"])
    assert [i["sop_instance_uid"] for i in items] == [r[1] for r in rows]  # the training order is the saved order


def test_merged_identity_member_keeps_its_own_patients_pseudonym(any_ctx):
    """With match_name_birthdate two patient IDs are one person: one image is taken, and its
    pseudonym is the one of the PatientID on that image (not of the other ID)."""
    from app.labels.service import make_labeler
    from tests.factories.index_rows import add_index_rows
    from tests.cohorts.cohort_index import knee

    recs = [knee("OLD-ID", "L", patient_name="SAME^PERSON", sop_instance_uid="1.8.1"),
            knee("NEW-ID", "L", patient_name="same^person", sop_instance_uid="1.8.2")]
    with any_ctx.sessions() as s:
        add_index_rows(s, recs, make_labeler(s))
        s.commit()
    out = _create(any_ctx, match_name_birthdate=True, check_files=False)
    rows = _saved(any_ctx, out["id"])
    assert out["size"] == len(rows) == 1 and out["excluded"]["duplicate_patient"] == 1
    (_iid, uid, _p, _c, _s, key, _u, _pa, pid, issuer), = rows
    assert key == patient_key(KEY, {"1.8.1": "OLD-ID", "1.8.2": "NEW-ID"}[uid], "") == patient_key(KEY, pid, issuer)


def test_member_lookups_in_chunks_give_the_same_snapshot(any_ctx, index, monkeypatch):
    """SQLite looks members' patients and files up in IN lists of _CHUNK ids: several chunks, same result."""
    import app.cohorts.builder as builder

    whole = _create(any_ctx, seed=5)
    monkeypatch.setattr(builder, "_CHUNK", 7)
    chunked = _create(any_ctx, seed=5)
    assert chunked["size"] == whole["size"] == 50 and chunked["excluded"] == whole["excluded"]
    with any_ctx.sessions() as s:
        assert manifest_csv(s, chunked["id"]) == manifest_csv(s, whole["id"])


@pytest.mark.parametrize("gone", ["instance", "patient"])
def test_an_instance_gone_before_the_save_saves_nothing(any_ctx, index, monkeypatch, gone):
    """An instance (or its patient, and with it the instance) deleted between the selection and the
    member INSERT (PostgreSQL reads what is committed per statement): a Conflict, and no cohort row
    or member is left in the session."""
    from sqlalchemy import delete

    import app.cohorts.service as service
    from app.db.models import Patient
    from app.errors import Conflict

    real_build = service.build

    def build_then_delete(session, *a, **kw):
        result = real_build(session, *a, **kw)
        m = result.members[3]
        if gone == "instance":
            session.execute(delete(Instance).where(Instance.id == m["instance_pk"]))
        else:
            session.execute(delete(Patient).where(Patient.id == m["patient_pk"]))
        return result

    monkeypatch.setattr(service, "build", build_then_delete)
    with any_ctx.sessions() as s:
        with pytest.raises(Conflict, match=r"^1 of the 51 selected instances left the index"):
            create_cohort(s, {"taxonomy": "xr10", "check_files": False}, pseudonym_key=KEY, store_dir=None)
        assert s.scalar(select(func.count()).select_from(Cohort)) == 0
        assert s.scalar(select(func.count()).select_from(CohortMember)) == 0
        s.commit()  # even a caller that commits after the error saves nothing
        assert s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "cohort.create")) == 0
