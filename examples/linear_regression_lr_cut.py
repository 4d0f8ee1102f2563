"""Seed program (c): the linear regression of linear_regression.py plus the adaptive rule: when the
loss falls below 0.01, set the learning rate to one tenth of the initial one.

The rule reads the loss already averaged over all replicas and processes, so every rank cuts at the
same epoch (a per-rank decision on local losses would let the ranks drift apart). The LRController
keeps whether the cut happened in a variable: tf.train.Checkpoint(lr=controller) saves it.

    python examples/linear_regression_lr_cut.py --backend single
    horovodrun -np 2 python examples/linear_regression_lr_cut.py
"""

from __future__ import annotations

from linear_regression import parse_args, run

if __name__ == "__main__":
    from disttrain.lr import LossThresholdCut, LRController

    run(parse_args(), callbacks_fn=lambda: [
        LRController(policies=[LossThresholdCut(thresholds=0.01, factor=0.1)], verbose=1)])
