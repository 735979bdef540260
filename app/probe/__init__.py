"""Capability probe of a PACS node: what it answers, what it sends, and where it caps."""
