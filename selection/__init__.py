"""Data side of the pipeline: corpus preparation, scoring, selection."""
