"""frugalseg: semantic segmentation from cheap supervision (tags, few masks, nothing).

The library is plain functions and small modules; the `frugalseg` command and the Lightning
glue are layers on top. Heavy submodules import lazily so `import frugalseg` stays fast.
"""

from frugalseg.errors import DataError, FrugalsegError

__version__ = "0.1.0"
__all__ = ["DataError", "FrugalsegError", "__version__"]
