"""Taxonomies, the cohort builder, frozen snapshots and manifests."""
