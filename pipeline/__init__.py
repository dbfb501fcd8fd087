"""The batch pipeline: Parquet manifest in, one Ray task per image, outputs and results to storage."""
