"""tunelab: compare fine-tuning methods for transformer models, trained the same fair way."""
__version__ = "0.1.0"

from .api import compare, sweep, validate  # noqa: E402
from .use.export import export  # noqa: E402
from .use.predict import predict  # noqa: E402

__all__ = ["compare", "export", "predict", "sweep", "validate", "__version__"]
