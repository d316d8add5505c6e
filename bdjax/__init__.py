"""bdjax: backdoor attacks and defenses in JAX."""
from bdjax import runtime as _runtime

# Must run before any JAX computation in this process; see bdjax/runtime.py for why.
_runtime.use_all_cpu_cores()

from bdjax.errors import BdjaxError, CheckpointError, ConfigError, DataError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BdjaxError", "CheckpointError", "ConfigError", "DataError", "__version__"]
