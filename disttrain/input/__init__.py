"""The input: from a user's dataset, files or function to each epoch's per-replica batches.

``data`` (the entry point, public as ``dt.data``: sources), ``pipelines`` (sharding, batching, padding),
``data_checks`` (unbatched examples that fit the model, one element spec on every rank, label dtypes),
``epoch_agreement`` (every process runs the same steps), ``release`` (finished epochs' iterators torn down
on a background thread) and ``shards`` (TFRecord shard files, public as ``dt.shards``).

May import: ``disttrain.input`` and ``disttrain.backends`` only (not the loop, not the trainer);
``tests/test_structure.py`` checks it.
"""
