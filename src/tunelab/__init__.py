"""tunelab: compare fine-tuning methods for transformer models, trained the same fair way."""
__version__ = "0.1.0"

# The subpackages named like API functions are imported first: importing a subpackage later (as the commands
# do, lazily) would rebind `tunelab.sweep` etc. to the module and hide the function.
from . import estimate as _estimate_package, report as _report_package, sweep as _sweep_package  # noqa: E402,F401
from .api import compare, sweep, validate  # noqa: E402
from .api_plan import estimate, recommend, report  # noqa: E402
from .use.export import export  # noqa: E402
from .use.predict import predict  # noqa: E402

__all__ = ["compare", "estimate", "export", "predict", "recommend", "report", "sweep", "validate", "__version__"]
