"""maxlm: a JAX/Flax training stack for decoder language models.

Owns the public entry points; heavy submodules are imported lazily by their users.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

__version__ = "0.1.0"

# kernels/, data_pipelines/ and configs/ install as maxlm.kernels, maxlm.data_pipelines and maxlm.configs
# (pyproject's package-dir). Run from a source checkout's root, `maxlm` is this folder, found before any install;
# the finder below, last on sys.meta_path, maps the three names to the checkout's folders when no install did.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FOLDERS = {"maxlm.kernels": "kernels", "maxlm.data_pipelines": "data_pipelines", "maxlm.configs": "configs"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):

  def find_spec(self, fullname, path=None, target=None):
    folder = os.path.join(_CHECKOUT, _FOLDERS.get(fullname, ""))
    if fullname not in _FOLDERS or not os.path.isfile(os.path.join(folder, "__init__.py")):
      return None
    return importlib.util.spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])


if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")) and not any(
    isinstance(f, _CheckoutFinder) for f in sys.meta_path):
  sys.meta_path.append(_CheckoutFinder())


def step_aside(name: str) -> None:
  """Called by kernels/, data_pipelines/ and configs/ when Python imports them under their bare folder name (the
  checkout's root is on sys.path, as with `python -m` run from it): another installed package of that name (Hugging
  Face's `kernels`, which transformers and peft import) takes its place in sys.modules; without one, the import
  fails as if the folder were not there."""
  path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _CHECKOUT]
  spec = importlib.machinery.PathFinder.find_spec(name, path)
  if spec is None:
    raise ModuleNotFoundError(f"No module named {name!r} (this checkout's {name}/ folder is maxlm.{name})", name=name)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # the import statement returns what sys.modules holds once this module's body ends
  spec.loader.exec_module(module)
