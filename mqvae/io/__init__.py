"""What a run writes and reads back: atomic files and folder locks (``files``), checkpoints (``checkpoint``), the
run's provenance (``provenance``) and its scalar logs, log.jsonl and TensorBoard (``tracking``)."""
