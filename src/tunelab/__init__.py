"""tunelab: compare fine-tuning methods for transformer models, trained the same fair way."""
__version__ = "0.1.0"

from .api import compare, validate  # noqa: E402

__all__ = ["compare", "validate", "__version__"]
