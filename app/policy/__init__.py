"""Per-node PACS etiquette: transfer windows, rate limits, concurrency, adaptive backoff."""
