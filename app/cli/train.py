"""`radcohort train`, `radcohort jobs list|follow|cancel`, `radcohort models list`: training from the shell.

The same validation as the API (app.training.jobs.check_request), on the configured database; the
commands never import torch (a `radcohort worker` runs the jobs).
"""

from __future__ import annotations

import typer


def register(cli: typer.Typer) -> None:  # filled in below
    pass
