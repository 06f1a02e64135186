"""kdscale: knowledge distillation of compact clinical prediction models on clusters."""
__version__ = "0.1.0"

from kdscale import compat as _compat

# Before anything imports timm/torchvision (see kdscale/compat.py).
_compat.install_import_hook()
