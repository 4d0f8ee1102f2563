"""The step loop's parts: what runs a user's step and what the trainer's loop keeps per step and epoch.

``position`` (the run's :class:`~disttrain.loop.position.RunPosition`, written by ``trainer.py`` only),
``step_context`` (what the step is handed), ``step_functions`` (the compiled steps and their
``StepResult``), ``step_calls`` (calling them), ``epoch_calls`` (an epoch's calls: variant, step count,
tracing), ``step_logs`` (the step-level logs) and ``totals`` (an epoch's running sums and their one
all-reduce).

May import: ``disttrain.loop``, ``disttrain.input``, ``disttrain.backends`` and the leaf modules
``disttrain.callbacks``, ``disttrain.metrics`` and ``disttrain.nonfinite`` (which import none of these
packages); never the trainer or checkpointing. ``tests/test_structure.py`` checks it.
"""
