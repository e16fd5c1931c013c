"""Small helpers shared by the method packages, one submodule each: ``io`` (atomic writes), ``errors``
(user-facing errors), ``loss`` (the loss protocol), ``loggers``, ``stats``, ``weights``, ``trainer``."""

from lpl.utils.errors import LplError
from lpl.utils.loss import module_loss

__all__ = ["LplError", "module_loss"]
