"""Validated training parameters: what a user may ask for, and the spec the worker hands to models.run."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EXPERIMENTS = ("rotate90", "scale10", "depth_ladder")
MAX_EPOCHS = 500
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024  # below 32 px the ResNets' five halvings leave nothing
MAX_BATCH_SIZE = 4096
# the study's depth experiment: one job per preset (models/ maps each to an architecture)
DEPTH_PRESETS = (4, 19, 34, 64)


class Augment(BaseModel):
    """Training-side augmentation; unset keys keep the worker's defaults (the study's +-10/20/30 deg)."""

    model_config = ConfigDict(extra="forbid")

    rotation: list[float] | float | None = Field(None, description="degrees: [10, 20, 30] = one of 0/+-each; [-30, 30] = a uniform range; 0 = none")
    shift: float | None = Field(None, ge=0, le=0.5, description="fraction of the image size")
    scale: float | None = Field(None, ge=0, le=0.5, description="relative scale jitter")
    intensity: float | None = Field(None, ge=0, le=1, description="relative intensity jitter")

    @field_validator("rotation")
    @classmethod
    def _rotation(cls, v):
        values = v if isinstance(v, list) else [v] if v is not None else []
        if any(not -180 <= x <= 180 for x in values):
            raise ValueError("rotation degrees must be within -180..180")
        return v


class TrainingParams(BaseModel):
    """Everything that shapes a run except the cohort; stored on the job as its final config."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("resnet18", pattern=r"^[a-z][a-z0-9_.]{1,63}$", description="timm model name")
    depth: Literal[4, 19, 34, 64] | None = Field(None, description="study depth preset; overrides model")
    epochs: int = Field(30, ge=1, le=MAX_EPOCHS, description="the study: 30; a CPU try-out: 2-10")
    image_size: int = Field(256, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE,
                            description="input height in pixels (aspect kept, padded); the study: 256, CPU: 64-96")
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH_SIZE, description="default 256 on CUDA, 32 on CPU")
    lr: float | None = Field(None, gt=0, le=10)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    augment: Augment = Field(default_factory=Augment, description="augmentation (training side only)")
    experiments: list[str] = Field(
        default_factory=list, json_schema_extra={"default": []},
        description="extra evaluations, none by default: rotate90 and scale10 (the study's 90° rotation and "
                    "10 % size tests on the test set), depth_ladder (one job per depth preset 4/19/34/64)")
    val_fraction: float = Field(
        0.1, ge=0, le=0.5,
        description="patients of each class held out of the cohort's train split (seeded) for the per-epoch "
                    "val_accuracy; 0 = none (val_accuracy is then null). The test split is only used once, "
                    "after the last epoch. Ignored when the cohort has its own val split")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    compile: bool = False
    weights: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.(pt|pth|safetensors)$",
                                description="file name under DATA_DIR/weights (no downloads, no paths)")
    workers: int | None = Field(None, ge=0, le=256, description="preprocessing processes")
    suspect_threshold: float = Field(0.99, gt=0, le=1, description="confidence for header suspects")

    @field_validator("experiments")
    @classmethod
    def _experiments(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(EXPERIMENTS))
        if unknown:
            raise ValueError(f"unknown experiment(s) {unknown}; allowed: {list(EXPERIMENTS)}")
        return list(dict.fromkeys(v))  # keep order, drop duplicates


    def to_config(self) -> dict:
        """The stored job params (unset augment keys left out so the worker's defaults apply)."""
        return {**self.model_dump(mode="json"), "augment": self.augment.model_dump(mode="json", exclude_none=True)}


class TrainingJobCreate(TrainingParams):
    """Body of POST /api/v1/training-jobs."""

    cohort_id: int = Field(..., ge=1)

    def params(self) -> TrainingParams:
        return TrainingParams.model_validate(self.model_dump(exclude={"cohort_id"}))
