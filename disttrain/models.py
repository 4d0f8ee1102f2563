"""The models and optimizers a trainer is given: checked to be built, optimizers built inside the scope."""

from __future__ import annotations

from typing import Any


def check_built(models: list) -> None:
    """Checks that every model has its variables.

    Args:
      models: The trainer's Keras models.

    Raises:
      ValueError: Naming the first model without variables, and how to build it.
    """
    for m in models:
        if not m.trainable_variables:
            raise ValueError(f"model {m.name!r} has no variables yet; build it inside backend.scope() "
                             "(start it with keras.Input(shape=...) or call model.build(input_shape))")


def build_optimizers(backend: Any, *, models: list, optimizers: list) -> None:
    """Builds, inside the backend's scope, each optimizer that is not built yet (Keras 3.15 under
    MirroredStrategy fails at the first traced step otherwise): one optimizer on every model's trainable
    variables, or optimizer ``i`` on model ``i``'s when there are as many optimizers as models.

    Args:
      backend: The run's backend (its ``scope()`` is entered).
      models: The trainer's Keras models.
      optimizers: The trainer's Keras optimizers, built or not.

    Raises:
      ValueError: If an optimizer is not built and the optimizers do not pair up with the models.
    """
    unbuilt = [i for i, opt in enumerate(optimizers) if not opt.built]
    if not unbuilt:
        return
    if len(optimizers) == 1:
        targets = [[v for m in models for v in m.trainable_variables]]
    elif len(optimizers) == len(models):
        targets = [m.trainable_variables for m in models]
    else:
        opt = optimizers[unbuilt[0]]
        raise ValueError(f"optimizer {opt.name!r} is not built, and {len(optimizers)} optimizers for {len(models)} "
                         "models do not pair up (optimizer i builds on model i's variables); build each inside "
                         "backend.scope(): optimizer.build(the_variables_it_updates)")
    with backend.scope():
        for i in unbuilt:
            optimizers[i].build(targets[i])


def prepare(backend: Any, *, model: Any, optimizer: Any) -> tuple[list, list]:
    """The trainer's models and optimizers as lists, checked (built, created in the backend's scope), the
    optimizers built, and the initial state of both made the same on every replica.

    Args:
      backend: The run's backend.
      model: A Keras model or a list of them.
      optimizer: A Keras optimizer or a list of them.

    Returns:
      ``(models, optimizers)``.
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    check_built(models)
    backend.check_created_in_scope(models=models, optimizers=optimizers)
    build_optimizers(backend, models=models, optimizers=optimizers)
    backend.sync_initial_state([v for m in models for v in m.variables] + [v for o in optimizers for v in o.variables])
    return models, optimizers
