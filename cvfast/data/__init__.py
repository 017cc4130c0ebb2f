"""Data layer: read -> ingest -> sample -> blocks."""
