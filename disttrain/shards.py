"""``disttrain.shards`` (``dt.shards``): the public name of :mod:`disttrain.input.shards`, which it is.

``import disttrain.shards`` and ``from disttrain import shards`` give that module itself: one module object,
so ``isinstance`` checks and pickles see one set of classes (whose ``__module__`` is the real one).
"""

import sys

from disttrain.input import shards as _module

sys.modules[__name__] = _module
