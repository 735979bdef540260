"""The training contract, typed once: what a user may ask for (`TrainingParams`, the API's schema) and
the RUN_DIR/spec.json the service writes and the trainer reads (`RunSpec`).

This module imports pydantic only: it is the one module of models/ that app/ imports (app/training
builds the spec from a job, models/run.py reads it), and models/ imports nothing of app/
(docs/architecture.md, rule 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# user-facing experiments; depth_ladder is expanded by the service into one job per depth preset
EXPERIMENTS = ("rotate90", "scale10", "depth_ladder")
RUN_EXPERIMENTS = ("rotate90", "scale10")  # what one run evaluates (spec.json)
MAX_EPOCHS = 500
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024  # below 32 px the ResNets' five halvings leave nothing
MAX_BATCH_SIZE = 4096
# the study's depth experiment: one job per preset (models/registry.py maps each to an architecture)
DEPTH_PRESETS = (4, 19, 34, 64)
SPLITS = ("train", "val", "test")


class Augment(BaseModel):
    """Training-side augmentation; unset keys keep the worker's defaults (the study's +-10/20/30 deg)."""

    model_config = ConfigDict(extra="forbid")

    rotation: list[float] | float | None = Field(None, description="degrees: [10, 20, 30] = one of 0/+-each; [-30, 30] = a uniform range; 0 = none")  # noqa: E501
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
    augment: Augment = Field(default_factory=Augment, description="augmentation (training side only)")  # type: ignore[arg-type]  # noqa: E501
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


class RunParams(BaseModel):
    """spec.json `params`: what one run trains with. The job's TrainingParams less what the service
    applies itself (val_fraction: the items' splits; depth_ladder: one job per preset; weights: resolved
    to a path), plus the trainer's own knobs. Unset (None) values take the trainer's defaults
    (models/config.py)."""

    model_config = ConfigDict(protected_namespaces=())

    model: str = "resnet18"
    depth: int | None = None  # 4, 19, 34 or 64: overrides `model` (see models/registry.py)
    epochs: int = 30  # study A: 30 epochs
    image_size: int = 256  # study A: input height 256 px, aspect ratio kept, padded square
    batch_size: int | None = None  # None: 256 on CUDA, 32 on CPU
    lr: float | None = None  # None: 1e-3 (AdamW)
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    augment: dict[str, Any] | None = None  # Augment's keys; unset ones keep the trainer's defaults
    experiments: list[str] = Field(default_factory=list)  # none unless asked for (rotate90, scale10)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False
    weights: str | None = None  # a local weights file (no downloads)
    workers: int | None = None  # None: all CPU cores for preprocessing
    suspect_threshold: float = 0.99
    # Evaluate the test split each epoch when there is no "val" split. Off: the test set is used once,
    # after the last epoch, and val_accuracy means validation (the API holds a val split out of train).
    monitor_test: bool = False

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown training parameter(s): {', '.join(unknown)}")
            # null means "the default" (for the None-able fields the default is None anyway)
            data = {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("depth")
    @classmethod
    def _depth(cls, v: int | None) -> int | None:
        if v is not None and v not in DEPTH_PRESETS:
            raise ValueError(f"depth must be one of 4, 19, 34, 64 (got {v})")
        return v

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v: int) -> int:
        if v < 1:
            raise ValueError("epochs must be >= 1")
        return v

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, v: int) -> int:
        if not 16 <= v <= 2048:
            raise ValueError("image_size must be between 16 and 2048")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("batch_size must be >= 1")
        return v

    @field_validator("augment")
    @classmethod
    def _augment(cls, v: dict | None) -> dict | None:
        if v is not None:
            extra = sorted(set(v) - set(Augment.model_fields))
            if extra:
                raise ValueError(f"unknown augment key(s): {', '.join(extra)}")
        return v

    @field_validator("experiments")
    @classmethod
    def _run_experiments(cls, v: list[str]) -> list[str]:
        bad = sorted(set(v) - set(RUN_EXPERIMENTS))
        if bad:
            raise ValueError(f"unknown experiment(s): {', '.join(bad)}; known: {', '.join(RUN_EXPERIMENTS)}")
        return v

    @field_validator("suspect_threshold")
    @classmethod
    def _suspect_threshold(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("suspect_threshold must be in (0, 1]")
        return v


class SpecItem(BaseModel):
    """One image of the run: its file, its class, its split."""

    model_config = ConfigDict(populate_by_name=True)

    sop_instance_uid: str
    path: str
    class_: str = Field(alias="class")
    split: Literal["train", "val", "test"]

    def as_dict(self) -> dict[str, str]:
        return self.model_dump(by_alias=True)


class SpecMeta(BaseModel):
    """Provenance, copied into the model card (other keys are kept)."""

    model_config = ConfigDict(extra="allow")

    cohort_id: int | None = None
    taxonomy: str | None = None
    ruleset_version: str | None = None
    code_version: str | None = None


class SpecError(ValueError):
    """spec.json is malformed (models.run writes the message to error.txt)."""


class RunSpec(BaseModel):
    """RUN_DIR/spec.json: written by the service (app.training.jobs.build_spec), read by models.run."""

    job_id: int | None = None
    run_dir: str
    cache_dir: str
    classes: list[str]
    items: list[SpecItem]
    params: RunParams = Field(default_factory=RunParams)
    meta: SpecMeta = Field(default_factory=SpecMeta)

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError("'classes' must list at least 2 distinct class names")
        return v

    @model_validator(mode="after")
    def _items(self) -> "RunSpec":
        known, seen = set(self.classes), set()
        for i, it in enumerate(self.items):
            if it.class_ not in known:
                raise ValueError(f"items[{i}] has class {it.class_!r} not in 'classes'")
            if it.sop_instance_uid in seen:
                raise ValueError(f"SOPInstanceUID {it.sop_instance_uid} listed twice")
            seen.add(it.sop_instance_uid)
        return self

    @classmethod
    def parse(cls, data: dict) -> "RunSpec":
        """Validate spec.json's content; SpecError names what is wrong (params errors included)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError("spec.json: " + "; ".join(_describe(e) for e in exc.errors())) from None

    @classmethod
    def read(cls, path: str | Path) -> "RunSpec":
        return cls.parse(json.loads(Path(path).read_text()))

    def to_json(self) -> dict:
        """The JSON object written as spec.json (None values left out: the trainer's defaults apply)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _describe(err: Any) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    if err.get("type") == "missing":
        return f"missing {loc!r}"
    return f"{loc}: {msg}" if loc else msg
