"""Register pyquant with transformers as soon as transformers loads its models, not before.

``import pyquant`` must stay light (it never imports transformers: ~8 s on
2 cores), yet after it ``AutoModelForCausalLM.from_pretrained`` of a pyquant
checkpoint has to find pyquant's HfQuantizer. So ``install()`` (called by
``import pyquant``) adds a finder to ``sys.meta_path`` that watches for
``transformers.modeling_utils``, the module every model class and
``from_pretrained`` goes through, and registers pyquant right after that module
has run (``pyquant.integrations.hf_quantizer.register``). If transformers is
already loaded, it registers at once. The finder loads nothing itself: it
hands the module to the finder that would have loaded it and only adds the
call afterwards.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings

WATCHED = "transformers.modeling_utils"
_REGISTRAR = "pyquant.integrations.hf_quantizer"


def register_now() -> None:
    """Register pyquant's quantization config, quantizer and save hook with transformers."""
    try:
        importlib.import_module(_REGISTRAR).register()
    except Exception as exc:  # noqa: BLE001  (a failure here must not break transformers' own import)
        warnings.warn(f"pyquant could not register with transformers ({type(exc).__name__}: {exc}); "
                      "from_pretrained will not read pyquant checkpoints", RuntimeWarning, stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        register_now()

    def __getattr__(self, name):  # get_source, get_filename...: the real loader's
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)


class _WatchTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now if transformers' models are loaded, else when they are (idempotent)."""
    if WATCHED in sys.modules:
        register_now()
    elif not any(isinstance(f, _WatchTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _WatchTransformers())
