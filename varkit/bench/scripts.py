"""The side-by-side comparisons with official checkouts: scripts of varkit's repository, not of the package.

``bench/side_by_side/<name>.py`` (next to the ``varkit/`` package in a source checkout) imports an official
repository's code and times it against varkit on the same weights. They are comparisons, not the product, so
the package holds only varkit's own benches; ``varkit bench <name> --official PATH`` runs the script when this
installation is a source checkout (an editable install), and says where to find it otherwise.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ..errors import InvalidArgumentError

#: where the scripts are in a source checkout: <repository>/bench/side_by_side/
SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "side_by_side"


def load_script(name: str) -> ModuleType:
    """The module of ``bench/side_by_side/<name>.py``; a one-line error when this installation has no such file."""
    path = SCRIPTS_DIR / f"{name}.py"
    if not path.is_file():
        raise InvalidArgumentError(
            f"--official: the comparison with the official code is the script bench/side_by_side/{name}.py of "
            f"varkit's source repository, which this installation does not include; run it from a clone of varkit: "
            f"python bench/side_by_side/{name}.py --official PATH ...")
    module_name = f"varkit_side_by_side_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
