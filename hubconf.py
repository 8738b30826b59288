"""torch.hub entry points: ``torch.hub.load("<owner>/transnext", "transnext_tiny", pretrained=True)``.

Every entry point takes the arguments of :func:`transnext.create_model` (``pretrained``,
``checkpoint_path``, ``num_classes``, ``img_size``, ``pos_bias``, ``fixed_pool_size``, ...).
``transnext_small_384`` / ``transnext_base_384`` are the 384 fine-tunes.
"""

import os
import sys

dependencies = ["torch"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(_SRC) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from transnext.models.registry import create_model as _create_model  # noqa: E402


def _entry(name):
    def fn(pretrained=False, **kwargs):
        return _create_model(name, pretrained=pretrained, **kwargs)

    fn.__name__ = name
    fn.__doc__ = f"{name} (``transnext.create_model({name!r}, pretrained=..., **kwargs)``)"
    return fn


transnext_micro = _entry("transnext_micro")
transnext_tiny = _entry("transnext_tiny")
transnext_small = _entry("transnext_small")
transnext_base = _entry("transnext_base")
transnext_micro_aaaa = _entry("transnext_micro_aaaa")
transnext_small_384 = _entry("transnext_small_384")
transnext_base_384 = _entry("transnext_base_384")
