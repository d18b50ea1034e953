"""fasp-bench's pruning library: FASP and its baselines, physically smaller Hugging Face checkpoints.

`import pruning` registers the project architectures (per-layer widths, narrow V heads) with
transformers' Auto classes, so pruned checkpoints load with `AutoModelForCausalLM.from_pretrained`.
"""

__version__ = "0.1.0"

from .api import PruneResult, prune  # noqa: E402
from .arch import get_adapter, supported_model_types  # noqa: E402
from .errors import PruningError  # noqa: E402
from .methods import METHODS  # noqa: E402

__all__ = ["METHODS", "PruneResult", "PruningError", "get_adapter", "prune", "supported_model_types"]

from .checkpoint import load_pruned, read_metadata, save_pruned  # noqa: E402

__all__ += ["load_pruned", "read_metadata", "save_pruned"]

from .streaming import prune_pretrained  # noqa: E402

__all__ += ["prune_pretrained"]
