"""PACS nodes and retrieval jobs: expected list (C-FIND) -> C-MOVE/C-GET -> arrivals -> exact report."""
