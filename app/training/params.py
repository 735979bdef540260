"""The body of POST /api/v1/training-jobs: a cohort and its TrainingParams (models/spec.py, the one contract)."""

from __future__ import annotations

from pydantic import Field

# the contract is models/spec.py (imported by both sides); these names are its, re-exported
from models.spec import (DEPTH_PRESETS, EXPERIMENTS, MAX_BATCH_SIZE, MAX_EPOCHS, MAX_IMAGE_SIZE,  # noqa: F401
                         MIN_IMAGE_SIZE, Augment, TrainingParams)


class TrainingJobCreate(TrainingParams):
    """Body of POST /api/v1/training-jobs."""

    cohort_id: int = Field(..., ge=1)

    def params(self) -> TrainingParams:
        return TrainingParams.model_validate(self.model_dump(exclude={"cohort_id"}))
