"""Learning rules, one per file, registered by name: `create_rule("dgl", net, aux_head="cnn")`,
`get_rule("backprop")`, `list_rules()`."""
from . import associated, auglocal, backprop, bwbpf, dgl, infopro, kernel, lra, predsim  # noqa: F401  (each registers its rule)
from .base import (
                   SCHEDULES,
                   LocalOutput,
                   Message,
                   Rule,
                   Stage,
                   create_rule,
                   detach,
                   get_rule,
                   list_rules,
                   make_options,
                   register_rule,
)

__all__ = ["LocalOutput", "Message", "Rule", "SCHEDULES", "Stage", "create_rule", "detach", "get_rule", "list_rules",
           "make_options", "register_rule"]
