"""Activation harvesting to Parquet shards (`nsbridge harvest`); MLX-free except `harvest.job`.

- `harvest.inputs`: documents from JSONL or Parquet (`{"text": ...}` or `{"messages": [...]}`).
- `harvest.store`: the output directory: Parquet shards written atomically, a progress file
  for resuming, and `_manifest.json` written last.
- `harvest.job`: one job end to end (input -> engine.harvest -> store), resumable.

Kept apart from engine/ (models, generation, capture) because the files are plain Arrow and
JSON: readers, and later workers that only write shards, need neither MLX nor a model.
"""
