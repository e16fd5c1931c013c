"""Small helpers shared by the method packages: atomic I/O, user-facing errors, the loss protocol."""

from lpl.utils.errors import LplError
from lpl.utils.loss import module_loss

__all__ = ["LplError", "module_loss"]
