"""Provokes the user mistakes disttrain must explain; writes the messages as JSON."""

import json

import disttrain as dt
import worker_args

args, backend = worker_args.start()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402


def message(fn):
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def step(ctx, batch):
    return tf.constant(0.0)


def build(inside_model: bool, inside_optimizer: bool):
    with backend.scope() if inside_model else tf.init_scope():
        model = keras.Sequential([keras.Input(shape=(2,)), keras.layers.Dense(1)])
    with backend.scope() if inside_optimizer else tf.init_scope():
        optimizer = keras.optimizers.Adam(0.1)
    return model, optimizer


results = {}
model, optimizer = build(True, False)
results["optimizer_outside"] = message(lambda: dt.Trainer(model=model, optimizer=optimizer, train_step=step,
                                                          backend=backend))
model, optimizer = build(False, True)
results["model_outside"] = message(lambda: dt.Trainer(model=model, optimizer=optimizer, train_step=step,
                                                      backend=backend))
model, optimizer = build(True, True)
trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0)
data = tf.data.Dataset.from_tensor_slices((tf.zeros([64, 2]), tf.zeros([64, 1])))
results["indivisible_batch"] = message(lambda: trainer.fit(data, global_batch_size=31))
results["batched_dataset"] = message(lambda: trainer.fit(data.batch(8), global_batch_size=8))
results["batch_larger_than_data"] = message(lambda: trainer.fit(data, global_batch_size=128))
results["unbuilt_model"] = message(lambda: dt.Trainer(model=keras.Sequential([keras.layers.Dense(1)]),
                                                      optimizer=optimizer, train_step=step, backend=backend))
results["no_eval_step"] = message(lambda: trainer.evaluate(data, global_batch_size=8))
with open(args.out, "w") as f:
    json.dump(results, f)
