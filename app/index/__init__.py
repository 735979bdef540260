"""The SQL index of stored instances: pure extraction and bulk ingest (takes a labeler callable)."""
