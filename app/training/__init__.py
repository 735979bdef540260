"""Training job queue records, claims and the read side of results (no torch here)."""
