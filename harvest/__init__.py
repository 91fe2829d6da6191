"""Activation harvesting to Parquet shards (`nsbridge harvest`, `POST /v1/harvest`).

- `harvest.inputs`: documents from JSONL or Parquet (`{"text": ...}` or `{"messages": [...]}`).
- `harvest.store`: the output directory: Parquet shards written atomically, a progress file
  for resuming, the shuffle pass, and `_manifest.json` written last.
- `harvest.job`: one job end to end (input -> engine.harvest -> store), resumable.
- `harvest.ray_job`: the same job's forwards on a Ray cluster (the optional extra `ray`).

Kept apart from engine/ (models, generation, capture) because `inputs` and `store` are plain
Arrow and JSON, MLX-free: readers need neither MLX nor a model. docs/harvest.md is the guide.
"""
