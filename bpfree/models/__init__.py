"""Networks as BlockNets: `create_model("cnn", num_classes, in_shape, blocks=4)`, `list_models()`."""
from . import transformer, zoo  # noqa: F401  (importing them registers the built-in models)
from .blocknet import (
                       BlockNet,
                       balanced_split,
                       create_model,
                       list_models,
                       max_blocks,
                       partition,
                       register_model,
                       split_units,
)
from .zoo import BasicBlock

__all__ = ["BasicBlock", "BlockNet", "balanced_split", "create_model", "list_models", "max_blocks", "partition",
           "register_model", "split_units"]
