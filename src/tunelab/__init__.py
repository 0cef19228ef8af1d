"""tunelab: compare fine-tuning methods for transformer models, trained the same fair way."""
__version__ = "0.1.0"

import importlib  # noqa: E402

from .api import compare, validate  # noqa: E402
from .api_plan import ls, recommend  # noqa: E402
from .config import ExperimentConfig  # noqa: E402  (a config every function takes, as a YAML file's path is)
from .errors import TunelabInputError  # noqa: E402  (what every function raises for bad input)
from .use.export import export  # noqa: E402
from .use.predict import predict  # noqa: E402

COMMAND_PACKAGES = ("estimate", "report", "sweep")  # subpackages that are their command's function too


def __getattr__(name: str):
    """`tunelab.estimate(...)`, `tunelab.report(...)`, `tunelab.sweep(...)` without importing those packages
    at `import tunelab` (see _commands.py)."""
    if name in COMMAND_PACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ExperimentConfig", "TunelabInputError", "compare", "estimate", "export", "ls", "predict", "recommend",
           "report", "sweep", "validate", "__version__"]
