"""Make torchvision (and therefore timm) importable on CPU-only torch builds.

PyPI's torchvision wheel is built against CUDA torch. On a CPU-only torch its compiled
extension (``torchvision/_C.so``) cannot load (it needs ``libc10_cuda.so``), and importing
torchvision then fails inside ``torchvision/_meta_registrations.py`` with
``RuntimeError: operator torchvision::nms does not exist``. timm imports torchvision, so
``import timm`` fails too (see docs/platform.md).

The fix: when -- and only when -- the extension cannot be loaded, declare the two operator
schemas that the meta registrations look up (``torchvision::nms`` and ``torchvision::qnms``)
before torchvision is imported. Models, transforms and timm then work; torchvision's compiled
ops raise torchvision's own clear "Couldn't load custom C++ ops" error. On a CUDA build, or a
CPU build whose extension loads, nothing is done.

It must run in every process that imports timm (DataLoader workers, torchrun children, SLURM
tasks). ``import kdscale`` applies it, and ``kdscale.compat.install_pth()`` (run by launch/env.sh) installs a
``.pth`` hook that applies it lazily the first time anything imports torchvision in the
environment, without importing torch at interpreter start-up.
"""
from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys
import sysconfig

_APPLIED = False
_LIBRARY = None  # keep the torch.library.Library alive: dropping it would unregister the schemas
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor",
)


def _torchvision_extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision absent: nothing to fix
    # imported by kdscale/__init__: torch only once torchvision is really imported
    import torch

    for location in spec.submodule_search_locations:
        for path in glob.glob(os.path.join(location, "_C*.so")) + glob.glob(os.path.join(location, "_C*.pyd")):
            try:
                torch.ops.load_library(path)
                return True
            except OSError:
                return False
    return True


def apply() -> bool:
    """Apply the fix if needed; returns True when the schemas were declared. Idempotent."""
    global _APPLIED, _LIBRARY
    if _APPLIED:
        return _LIBRARY is not None
    _APPLIED = True
    if "torchvision" in sys.modules:
        return False  # already imported (successfully, or the caller handles it)
    # imported by kdscale/__init__: torch only once torchvision is really imported
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        return False  # GPU build: torchvision's extension is expected to load
    if _torchvision_extension_loads():
        return False
    if hasattr(torch.ops.torchvision, "nms"):
        return False
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _LIBRARY.define(schema)
    return True


class _ApplyBeforeTorchvision(importlib.abc.MetaPathFinder):
    """Meta-path hook installed by the .pth file: applies the fix the first time torchvision is
    imported, then gets out of the way (returns None so the normal finders do the import)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            apply()
        return None


def install_import_hook() -> None:
    if not any(isinstance(f, _ApplyBeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _ApplyBeforeTorchvision())


PTH_NAME = "kdscale_torchvision_compat.pth"
PTH_LINE = "import kdscale.compat as _kc; _kc.install_import_hook()\n"


def install_pth(site_packages: str | None = None) -> str:
    target_dir = site_packages or sysconfig.get_paths()["purelib"]
    path = os.path.join(target_dir, PTH_NAME)
    with open(path, "w") as fh:
        fh.write(PTH_LINE)
    return path
