"""SAN-PEFT bench: parameter-efficient fine-tuning of vision backbones on VTAB-1K and FGVC.

Importing the package registers every method (SAN here, the baselines in `baselines`),
so that configs can name them.
"""

from san.methods import registry  # noqa: F401  (registers the base interface)
from san.methods.registry import available_methods, build_method, register_method

__all__ = ["available_methods", "build_method", "register_method"]


def _register_all() -> None:
    # Importing the modules runs their register_method calls; no central if/elif.
    import baselines  # noqa: F401
    import san.methods.san  # noqa: F401
    import san.methods.san_lora  # noqa: F401


_register_all()
