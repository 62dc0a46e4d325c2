"""Learning rules, one per file, registered by name: `get_rule("backprop")`, `list_rules()`."""
from .base import (LocalOutput, Message, Rule, SCHEDULES, Stage, detach, get_rule, list_rules,
                   make_options, register_rule)
from . import associated, backprop, bwbpf, dgl, kernel, lra, predsim  # noqa: F401  (each registers its rule)

__all__ = ["LocalOutput", "Message", "Rule", "SCHEDULES", "Stage", "detach", "get_rule", "list_rules",
           "make_options", "register_rule"]
