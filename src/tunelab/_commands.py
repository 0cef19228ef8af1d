"""Three subpackages share their name with the API function of their command: `tunelab.estimate`,
`tunelab.report` and `tunelab.sweep`. Python binds `tunelab.<name>` to the subpackage whenever it is first
imported (as the commands do, lazily), which would hide a function of that name; so each of these
subpackages is itself callable and runs its command's function, and `import tunelab.estimate as m` still
gives the package."""
from __future__ import annotations

import importlib
import sys
import types


class CommandPackage(types.ModuleType):
    """A package that, called, runs the function `__command__` of the module `__command_module__`."""

    def __call__(self, *args, **kwargs):
        module_name, function = self.__dict__["__command__"]
        return getattr(importlib.import_module(module_name), function)(*args, **kwargs)


def make_callable(package: str, module_name: str, function: str) -> None:
    module = sys.modules[package]
    module.__class__ = CommandPackage
    module.__command__ = (module_name, function)
