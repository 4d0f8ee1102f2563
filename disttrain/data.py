"""``disttrain.data`` (``dt.data``): the public name of :mod:`disttrain.input.data`, which it is.

``import disttrain.data`` and ``from disttrain import data`` give that module itself: one module object,
so ``isinstance`` checks and pickles see one set of classes (whose ``__module__`` is the real one).
"""

import sys

from disttrain.input import data as _module

sys.modules[__name__] = _module
