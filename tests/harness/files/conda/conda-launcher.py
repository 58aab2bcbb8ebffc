#!@PYTHON@
"""`conda` for the conda-stage test site: conda 24.7.1 as vendored by conda-lock.

conda-lock (PyPI) ships a complete copy of conda as ``conda_lock._vendor.conda``, but
parts of it still import ``conda.<module>`` by its original name.  A meta-path hook
makes every ``conda.X`` import return the very same module object as
``conda_lock._vendor.conda.X``, so there is one conda, with one configuration context.

Generated from tests/harness/files/conda/conda-launcher.py (@PYTHON@ is the site venv).
"""
import importlib
import importlib.abc
import importlib.util
import os
import sys

_VENDORED = "conda_lock._vendor.conda"


class _VendoredCondaAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "conda" or fullname.startswith("conda."):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(_VENDORED + spec.name[len("conda"):])

    def exec_module(self, module):
        pass  # already executed under its vendored name


def _bare_package(name):
    """Register package ``name`` without running its ``__init__``.

    ``conda_lock/__init__.py`` imports all of conda-lock (pydantic, poetry, ...): ~1 s
    on every conda call; the vendored conda needs none of it.
    """
    spec = importlib.util.find_spec(name)
    sys.modules[name] = importlib.util.module_from_spec(spec)


_bare_package("conda_lock")
sys.meta_path.insert(0, _VendoredCondaAlias())

# No GPUs here: an empty override skips conda's __cuda virtual-package probe, which
# otherwise starts a helper process on every solve.
os.environ.setdefault("CONDA_OVERRIDE_CUDA", "")

if __name__ == "__main__":  # the CUDA probe (if enabled) re-imports __main__ via spawn
    from conda_lock._vendor.conda.cli.main import main

    sys.exit(main())
