"""The public API stays: every name recorded here (read off the tree before issue 21 moved modules around)
must still be importable the ways users reach it. A name may be added; one that disappears fails."""

import importlib

import keras
import pytest

import disttrain as dt
from disttrain.backends.single import SingleBackend

#: ``disttrain.__all__`` as it was.
TOP_LEVEL = [
    "Backend", "Callback", "CheckpointError", "Checkpointing", "CollectiveError", "DriftError", "GradientOptions",
    "InputContext", "JsonLinesLogger", "NonFiniteError", "PREEMPTION_EXIT_CODE", "Preempted", "ProgressBar",
    "STALL_EXIT_CODE", "StepContext", "TensorBoard", "Trainer", "__version__", "current_learning_rate", "data",
    "detect", "get_backend", "lr", "metrics", "serving", "shards", "summaries",
]

#: Each public submodule's ``__all__`` and the public names it defined.
SUBMODULES = {
    "data": ["CHUNK", "INFINITE_STEPS", "MASK_KEY", "SHARDINGS", "Source", "as_source", "check_data", "from_dataset",
             "from_files", "mask_of"],
    "lr": ["FunctionRule", "LRController", "LinearScaling", "LossThresholdCut", "ReduceOnPlateau", "Rule", "Warmup",
           "controller_of", "replace_learning_rate", "set_learning_rate"],
    "metrics": ["StateLayout", "as_list", "flat_results", "from_function", "local_results", "merged_results",
                "merged_states", "pack_local_states", "reset", "result_items", "result_tensors", "results_from_vector",
                "states_from_vector", "warn_never_updated"],
    "serving": ["FORMATS", "format_of", "save_model"],
    "shards": ["MANIFEST", "batch_decoder", "decode_spec", "encode_spec", "list_shards", "read_shards", "shard_info",
               "write_shards"],
    "summaries": ["HISTOGRAM_BUCKETS", "HISTOGRAM_KINDS", "TensorBoard", "config_markdown", "histogram_buckets",
                  "histogram_value", "run_dir", "scalar_value"],
}

#: The public members of the classes users call or subclass (callbacks read the trainer's).
MEMBERS = {
    "Trainer": ["accumulation_steps", "backend", "callbacks", "checkpointing", "epoch", "epoch_lr", "epoch_step",
                "epoch_steps", "eval_metrics", "evaluate", "fit", "fit_config", "global_batch_size", "global_step",
                "history", "log_every_steps", "metrics", "model", "models", "on_nonfinite", "optimizer", "optimizers",
                "reset_compiled_steps", "run_config", "save_model", "step_timeout", "stop_training",
                "trainable_variables", "verbose"],
    "Callback": ["histogram_every_steps", "on_epoch_begin", "on_epoch_end", "on_histograms", "on_step_logs",
                 "on_train_begin", "on_train_end", "wants_gradients"],
    "TensorBoard": ["command", "start_profile", "stop_profile"],
    "StepContext": ["applies_gradients", "apply_gradients", "average_loss", "reduce_gradients", "run_accumulated",
                    "scale_regularization_loss", "take_flags", "take_nonfinite"],
    "Backend": ["all_reduce", "apply_gradients", "apply_reduced_gradients", "barrier", "broadcast",
                "check_created_in_scope", "checkpoint_writer", "default_step_timeout", "describe",
                "describe_collective_failure", "distribute_dataset", "gradient_options", "input_context",
                "input_waits_for_peers", "is_chief", "local_rank", "local_replicas", "local_sum", "local_values",
                "name", "num_replicas", "rank", "reduce_across_processes", "reduce_gradients", "replica_id", "run",
                "scope", "size", "stall_hint", "sync_initial_state"],
}


def test_top_level_names_stay():
    missing = [name for name in TOP_LEVEL if name not in dt.__all__ or not hasattr(dt, name)]
    assert missing == [], f"disttrain lost {missing}"


@pytest.mark.parametrize("name", sorted(SUBMODULES))
def test_submodule_names_stay(name):
    module = getattr(dt, name)
    assert importlib.import_module(f"disttrain.{name}") is module  # import disttrain.<name> is dt.<name>
    assert getattr(importlib.import_module("disttrain"), name) is module  # from disttrain import <name>
    missing = [n for n in SUBMODULES[name] if not hasattr(module, n)]
    assert missing == [], f"disttrain.{name} lost {missing}"


@pytest.mark.parametrize("cls", sorted(MEMBERS))
def test_class_members_stay(cls):
    missing = [n for n in MEMBERS[cls] if cls != "Trainer" and not hasattr(getattr(dt, cls), n)]
    assert missing == [], f"dt.{cls} lost {missing}"


def test_trainer_members_stay():
    backend = SingleBackend(device="/cpu:0")
    with backend.scope():
        model = keras.Sequential([keras.Input(shape=(2,)), keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.1)
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=lambda ctx, batch: 0.0, backend=backend,
                         verbose=0)
    missing = [n for n in MEMBERS["Trainer"] if not hasattr(trainer, n)]
    assert missing == [], f"dt.Trainer lost {missing}"
    assert (trainer.global_step, trainer.epoch, trainer.epoch_step, trainer.epoch_steps) == (0, 0, 0, 0)
