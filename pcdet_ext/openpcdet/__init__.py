"""The OpenPCDet glue: locating a checkout (:mod:`.locator`), registering this package's classes
(:mod:`.registry`), the CPU runtime (:mod:`.cpu`), datasets and the registered models.

Only :mod:`.locator` is imported here; ``models`` and ``datasets`` need OpenPCDet itself.
"""
from pcdet_ext.openpcdet.locator import (OpenPCDetNotFoundError, import_pcdet, pcdet_available, pcdet_tools_dir,
                                         pcdet_tools_module, require_pcdet)

__all__ = ["OpenPCDetNotFoundError", "import_pcdet", "pcdet_available", "pcdet_tools_dir", "pcdet_tools_module",
           "require_pcdet"]
