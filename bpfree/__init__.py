"""bpfree: train deep networks without end-to-end backpropagation, and measure what it buys."""
__version__ = "0.1.0"

from .config import RunConfig  # noqa: E402
from .data import Data, list_datasets, load_data  # noqa: E402
from .engine import Trainer  # noqa: E402
from .errors import BpfreeError  # noqa: E402
from .models import BlockNet, create_model, list_models  # noqa: E402
from .rules import Rule, Stage, get_rule, list_rules  # noqa: E402
from .run import RunOptions, train  # noqa: E402

__all__ = ["BlockNet", "BpfreeError", "Data", "Rule", "RunConfig", "RunOptions", "Stage", "Trainer", "create_model",
           "get_rule", "list_datasets", "list_models", "list_rules", "load_data", "train"]
