"""Validated training parameters: what a user may ask for, and the spec the worker hands to models.run."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EXPERIMENTS = ("rotate90", "scale10", "depth_ladder")
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
    epochs: int = Field(30, ge=1, le=1000)
    image_size: int = Field(256, ge=16, le=2048, description="input height in pixels (aspect kept, padded)")
    batch_size: int | None = Field(None, ge=1, le=65536)
    lr: float | None = Field(None, gt=0, le=10)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    augment: Augment = Field(default_factory=Augment, description="augmentation (training side only)")
    experiments: list[str] = Field(default_factory=lambda: ["rotate90", "scale10"],
                                   description="subset of rotate90, scale10, depth_ladder")
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
