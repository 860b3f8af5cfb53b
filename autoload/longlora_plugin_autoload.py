"""Installed at the top of site-packages with longlora_plugin_autoload.pth.

At interpreter start it only puts a finder on ``sys.meta_path`` (no imports). When transformers imports its
``modeling_utils`` (any model code does), the finder lets that module load, then imports ``longlora_plugin``, which
registers ``attn_implementation="s2_attention"``. Set LONGLORA_AUTOREGISTER=0 to switch this off.
"""

import sys

TRIGGER = "transformers.modeling_utils"
ENV_VAR = "LONGLORA_AUTOREGISTER"


def _register() -> None:
    try:
        import longlora_plugin  # noqa: F401  (registers on import)
    except Exception as error:  # never break the user's transformers import
        import warnings

        warnings.warn(f"longlora-plugin could not register s2_attention: {error!r}", stacklevel=3)


class _RegisterAfterImport:
    """A meta-path finder that wraps the trigger module's loader once, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != TRIGGER:
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_then_register(module):
            load(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
