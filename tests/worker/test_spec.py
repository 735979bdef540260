"""The typed training contract (models/spec.py): the service writes it, the trainer reads it."""

from __future__ import annotations

import pytest

from app.training.params import TrainingJobCreate
from models.config import merge_params
from models.spec import RunParams, RunSpec, SpecError, TrainingParams


def _spec(**kw) -> dict:
    spec = {"job_id": 1, "run_dir": "/tmp/r", "cache_dir": "/tmp/c", "classes": ["a", "b"],
            "items": [{"sop_instance_uid": "1.2.3", "path": "/x.dcm", "class": "a", "split": "train"},
                      {"sop_instance_uid": "1.2.4", "path": "/y.dcm", "class": "b", "split": "test"}],
            "params": {"epochs": 2}, "meta": {"cohort_id": 7, "taxonomy": "xr"}}
    spec.update(kw)
    return spec


def test_every_user_parameter_reaches_the_trainer():
    """One contract: what the API accepts (less what the service applies itself) is what a run reads."""
    service_side = {"val_fraction"}
    assert set(TrainingParams.model_fields) - service_side <= set(RunParams.model_fields)
    job = TrainingJobCreate(cohort_id=1, epochs=3, augment={"rotation": [10]}, experiments=["rotate90"])
    params = {k: v for k, v in job.params().to_config().items() if k not in service_side}
    cfg = merge_params(RunParams.model_validate(params))
    assert cfg.epochs == 3 and cfg.experiments == ["rotate90"]
    assert cfg.augment["rotation"] == [10] and cfg.augment["shift"] == 0.05  # unset keys: the trainer's defaults


def test_spec_round_trips_through_json():
    rs = RunSpec.parse(_spec())
    again = RunSpec.parse(rs.to_json())
    assert again == rs and again.items[0].as_dict()["class"] == "a"
    assert "lr" not in rs.to_json()["params"]  # None: the trainer's default, not written


@pytest.mark.parametrize(("change", "message"), [
    ({"classes": ["a"]}, "at least 2 distinct"),
    ({"items": [{"sop_instance_uid": "1", "path": "/p", "class": "z", "split": "train"}]}, "not in 'classes'"),
    ({"items": [{"sop_instance_uid": "1", "path": "/p", "class": "a", "split": "dev"}]}, "items.0.split"),
    ({"items": [{"sop_instance_uid": "1", "path": "/p", "class": "a", "split": "train"}] * 2}, "listed twice"),
    ({"params": {"depth": 18}}, "depth must be one of"),
    ({"params": {"colour": 1}}, "unknown training parameter"),
    ({"params": {"augment": {"blur": 1}}}, "unknown augment key"),
    ({"params": {"experiments": ["depth_ladder"]}}, "unknown experiment"),
    ({"run_dir": None}, "run_dir"),
])
def test_a_bad_spec_says_what_is_wrong(change, message):
    with pytest.raises(SpecError, match=message):
        RunSpec.parse(_spec(**change))
