"""Networks as BlockNets: `create_model("cnn", num_classes, in_shape, blocks=4)`, `list_models()`."""
from .blocknet import BlockNet, create_model, list_models, max_blocks, register_model, split_units
from . import zoo  # noqa: F401  (importing it registers the built-in models)

__all__ = ["BlockNet", "create_model", "list_models", "max_blocks", "register_model", "split_units"]
