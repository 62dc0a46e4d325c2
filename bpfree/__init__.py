"""bpfree: train deep networks without end-to-end backpropagation, and measure what it buys."""
from .config import RunConfig  # noqa: E402
from .data import Data, list_datasets, load_data  # noqa: E402
from .engine import Trainer  # noqa: E402
from .errors import BpfreeError  # noqa: E402
from .models import BlockNet, create_model, list_models  # noqa: E402
from .rules import Rule, Stage, create_rule, get_rule, list_rules  # noqa: E402
from .run import RunOptions, load_run_data, load_trained, train  # noqa: E402
from .version import __version__  # noqa: F401

__all__ = ["BlockNet", "BpfreeError", "Data", "Rule", "RunConfig", "RunOptions", "Stage", "Trainer", "create_model", "create_rule",
           "get_rule", "list_datasets", "list_models", "list_rules", "load_data", "load_run_data", "load_trained", "train"]
