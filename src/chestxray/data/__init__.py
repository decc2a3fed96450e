"""Data: getting the images (sources, ingestion) and turning them into model inputs (preprocess)."""
