"""Worklists: batch study requests from an uploaded CSV/XLSX (app.worklists)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/worklists", tags=["worklists"])
