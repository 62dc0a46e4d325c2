"""The learning-rule protocol: a rule cuts a BlockNet into stages that learn from local signals.

A *stage* owns its parameters, its optimizer and a local update::

    message_out = stage.step(message_in, labels)

Messages are small tuples of tensors. They are detached on the way out, so no gradient ever
crosses a stage boundary; E2EBP is the rule whose single stage holds the whole network.
Executors (the engine's one loop, in one process or on W ranks) only ever call this protocol, so
they need not know which rule they run.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..errors import BpfreeError
from ..models import BlockNet
from ..optim import OptimConfig, make_optimizer, make_scheduler
from ..options import check_options
from ..precision import PRECISIONS, autocast, grad_scaler
from ..registry import Registry

Message = tuple[torch.Tensor, ...]
SCHEDULES = ("simultaneous", "sequential")


def detach(message: Message) -> Message:
    return tuple(t.detach() for t in message)


@dataclass
class LocalOutput:
    """What one stage computes on one batch during training."""

    loss: torch.Tensor                    # the stage's local objective (a scalar)
    message: Message                      # what the next stage receives (detached by `step`)
    logits: Optional[torch.Tensor] = None  # the stage's own class scores, if it has a readout


class StageStats:
    """Running sums of a stage's local loss and readout accuracy, kept on-device to avoid syncs."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss_sum, self.correct, self.seen, self.steps = 0.0, 0, 0, 0

    def add(self, out: LocalOutput, labels: torch.Tensor):
        self.loss_sum = self.loss_sum + out.loss.detach()
        self.steps += 1
        if out.logits is not None:
            self.correct = self.correct + (out.logits.detach().argmax(1) == labels).sum()
            self.seen += labels.numel()

    def summary(self) -> dict:
        row = {"loss": float(self.loss_sum) / max(1, self.steps)}
        if self.seen:
            row["train_acc"] = float(self.correct) / self.seen
        return row


class Stage(nn.Module, metaclass=abc.ABCMeta):
    """One independently trained piece of a network.

    Subclasses define the inference path `forward(*message) -> message`, the training-time
    `local(message, labels) -> LocalOutput`, and, if the stage has its own classifier,
    `readout(message_out) -> logits`. `step` is the update shared by every gradient-based rule;
    a gradient-free rule overrides it.
    """

    # Whether this stage's update reads class identities. A stage that learns from pairwise
    # (same class or not) labels alone sets False; under --output-labels N only stages that read
    # class identities are restricted to the N labelled examples per class.
    uses_class_labels: bool = True
    # The --precision values this stage trains in (a gradient-free stage may need float32 throughout).
    precisions: tuple[str, ...] = PRECISIONS

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.stats = StageStats()
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.scaler: Optional[torch.amp.GradScaler] = None
        self.precision = "fp32"

    # --- what a rule defines -------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, *message: torch.Tensor) -> Message:
        """The inference path: this stage's output message, no update."""

    def local(self, message: Message, labels: torch.Tensor) -> LocalOutput:
        """The training-time computation: local loss, output message, own class scores. (A rule
        that overrides `step`, e.g. a top-down one, need not define it.)"""
        raise NotImplementedError(f"stage {self.name} has no standalone local objective")

    def readout(self, message: Message) -> Optional[torch.Tensor]:
        """Class scores of this stage's own classifier on its output message (None: it has none)."""
        return None

    def param_groups(self, cfg: OptimConfig) -> list[dict]:
        """Parameter groups for the optimizer; override to give parts their own lr."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    # --- what executors call -------------------------------------------------------------
    def configure(self, cfg: OptimConfig, total_steps: int, precision: str = "fp32") -> None:
        """Build this stage's optimizer, a schedule spanning the steps it will train for, and its
        precision (autocast dtype; a gradient scaler for fp16)."""
        self.precision = precision
        groups = [g for g in self.param_groups(cfg) if g["params"]]
        if not groups:
            return
        self.optimizer = make_optimizer(groups, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, total_steps)
        self.scaler = grad_scaler(precision, groups[0]["params"][0].device)

    def step(self, message: Message, labels: torch.Tensor) -> Message:
        """One local update on one batch; returns the detached message for the next stage.

        The forward pass and the local loss run under autocast (`--precision`); the backward pass
        and the update do not. fp16 scales the loss (this stage's own scaler)."""
        with autocast(self.precision, labels.device):
            out = self.local(detach(message), labels)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            out.loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(out.loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.stats.add(out, labels)
        return detach(out.message)

    def compile_for(self, backend: str) -> None:
        """torch.compile this stage's forward pass and its local objective (what `step` runs before
        the backward pass); a rule whose step does not use `local` gets its forward pass compiled."""
        self.local = torch.compile(self.local, backend=backend)
        nn.Module.compile(self, backend=backend)

    # --- top-down rules only (Rule.top_down): run after every stage's `step` on the batch ---------
    def feedback(self, signal: Message, labels: torch.Tensor) -> Message:
        """Take the signal from the stage above (an empty tuple for the last stage), set this stage's
        learning signals from it and return the signal for the stage below (detached tensors)."""
        raise NotImplementedError(f"stage {self.name} has no top-down feedback")

    def update(self) -> None:
        """Apply the update prepared by `step` and `feedback` on this batch."""
        raise NotImplementedError(f"stage {self.name} has no top-down update")

    def training_state(self) -> dict:
        """Everything needed to resume this stage exactly: weights, optimizer, schedule, loss scale."""
        return {
            "module": self.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else {},
            "scheduler": self.scheduler.state_dict() if self.scheduler else {},
            "scaler": self.scaler.state_dict() if self.scaler else {},
        }

    def load_training_state(self, state: dict) -> None:
        self.load_state_dict(state["module"])
        if self.optimizer and state["optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    # --- as a frozen feature extractor (bpfree.transfer): defaults for any stage ---------------
    def extracts_features(self) -> bool:
        """Whether this stage's output can serve as features; False for an output layer on top of
        frozen features (transferability leaves it out)."""
        return True

    def feature_pool(self) -> Optional[int]:
        """How the feature map phi = unit-norm(pool(ReLU(z))) pools this stage's output when it ends a
        feature extractor: conv maps average-pooled to p x p (None: not pooled). Default 1, global."""
        return 1


class Rule(abc.ABC):
    """A learning rule: turns a BlockNet into stages and says how to predict.

    Subclasses set `name`, `description`, the schedules they support, an `Options` dataclass of
    their hyperparameters (exposed as CLI flags), and implement `build_stages`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    schedules: ClassVar[tuple[str, ...]] = SCHEDULES
    default_schedule: ClassVar[str] = "simultaneous"
    # Why the rule has as few stages as it has, where that limits execution (shown by --parallel).
    stages_note: ClassVar[str] = ""
    # Whether stages also learn from a signal sent back down (rec-LRA's targets). Executors then run,
    # per batch: every stage's `step` bottom-up, `feedback` top-down (each stage's returned signal
    # goes to the stage below, like a message going up), then every stage's `update`.
    top_down: ClassVar[bool] = False
    # Whether a stage's readout or per-epoch diagnostic reads other stages' modules (AL's readouts
    # decode through the lower components; LRA's alignment probe runs the stages above). A parallel
    # executor then refreshes every rank's copy of every stage after each epoch; other rules' weights
    # stay where they live.
    needs_all_stages: ClassVar[bool] = False

    @dataclass
    class Options:
        pass

    def __init__(self, net: BlockNet, options: Optional["Rule.Options"] = None):
        self.net = net
        self.options = check_options(options if options is not None else self.Options())
        self.stages = nn.ModuleList(self.build_stages(net, self.options))

    @abc.abstractmethod
    def build_stages(self, net: BlockNet, options) -> list[Stage]:
        """Cut `net` into stages, adding whatever local machinery the rule needs."""

    def to(self, device) -> "Rule":
        self.stages.to(device)
        return self

    @property
    def prediction_stage(self) -> int:
        """The stage whose readout is the rule's prediction; the last by default."""
        return len(self.stages) - 1

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
        """The prediction's class scores and each stage's own readout, from one pass through the stages."""
        message, readouts = (x,), []
        for stage in self.stages:
            message = stage(*message)
            readouts.append(stage.readout(message))
        return readouts[self.prediction_stage], readouts

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores: run the stages up to the prediction stage, then its readout."""
        message = (x,)
        for stage in list(self.stages)[: self.prediction_stage + 1]:
            message = stage(*message)
        return self.stages[self.prediction_stage].readout(message)

    # --- as a frozen feature extractor (bpfree.transfer): defaults for any rule ----------------
    def feature_stages(self) -> list[Stage]:
        """The stages that extract features, in order: every stage but the last (the one that
        classifies), or the only stage."""
        stages = list(self.stages)
        return stages[:-1] if len(stages) > 1 else stages


# --- registry ------------------------------------------------------------------------------
_RULES: Registry[type[Rule]] = Registry("method")


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Class decorator registering a rule under its `name` (refused if the name is taken)."""
    return _RULES.register(cls.name, cls, cls.description)


def get_rule(name: str) -> type[Rule]:
    return _RULES.get(name)


def list_rules(pattern: Optional[str] = None) -> dict[str, str]:
    """Rule names (those matching a shell-style `pattern`, e.g. "lra*") -> descriptions."""
    return _RULES.describe(pattern)


def make_options(rule: type[Rule], values: dict) -> Rule.Options:
    """Build a rule's Options from a dict, naming unknown keys and the valid ones.

    Each field's type and metadata are enforced by `bpfree.options.check_options`, for every rule
    alike: `choices`, `min` / `max` (inclusive), `below`, `positive` (> 0). An Options class may add
    a `validate()` method for constraints that involve several fields.
    """
    fields = {f.name: f for f in dataclasses.fields(rule.Options)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise BpfreeError(f"method {rule.name} has no option {unknown[0]!r}; its options: {valid}")
    return check_options(rule.Options(**values))
