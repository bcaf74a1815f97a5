"""fedslim: federated learning where the base stays home and only a fast layer travels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedslim.export import load_model

__version__ = "0.1.0"
__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    # Imported when first asked for: `import fedslim` stays cheap (no torch) for the command line and the apps.
    if name == "load_model":
        from fedslim.export import load_model

        return load_model
    raise AttributeError(f"module 'fedslim' has no attribute {name!r}")
