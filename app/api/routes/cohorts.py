"""Routes (placeholder: filled in by the stage that owns this resource)."""

from fastapi import APIRouter

router = APIRouter()
