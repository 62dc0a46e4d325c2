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
from typing import Callable, ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BpfreeError
from ..models import BlockNet
from ..models.modes import channels_last_is_exact, evaluating
from ..optim import OptimConfig, make_optimizer, make_scheduler
from ..options import check_options
from ..precision import PRECISIONS, autocast, grad_scaler
from ..registry import Registry
from .step import train_batch

Message = tuple[torch.Tensor, ...]
SCHEDULES = ("simultaneous", "sequential")
EVAL_BATCH = 1024     # inference batch: the Trainer's evaluation, `predict` and `evaluate` alike


def detach(message: Message) -> Message:
    return tuple(t.detach() for t in message)


def class_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of class scores (B, C) against labels (B,), or of per-position scores (B, T, C)
    (a language model's next-token scores) against labels (B, T), averaged over every position."""
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction=reduction)


def refuse(rule: str, net: BlockNet, why: str, *, tokens: bool = False, per_position: bool = False) -> None:
    """One line saying why `rule` does not apply to `net`: its blocks output token sequences (T, D), or
    it predicts per position (a language model)."""
    if (tokens and any(len(s) == 2 for s in net.block_shapes())) or (per_position and net.per_position):
        what = "a language model (one label per token)" if per_position and net.per_position \
            else "transformer blocks (token sequences)"
        raise BpfreeError(f"method {rule} does not apply to {what}: {why}")


def hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many of the labels (one per example, or per position) the scores' top class gets right."""
    return (logits.argmax(-1) == labels).sum()


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
        self.last: Optional[torch.Tensor] = None

    def add(self, out: LocalOutput, labels: torch.Tensor):
        self.last = out.loss.detach()             # this step's local loss (train_step returns it)
        self.loss_sum = self.loss_sum + self.last
        self.steps += 1
        if out.logits is not None:
            self.correct = self.correct + hits(out.logits.detach(), labels)
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
        if self.optimizer is None:
            raise BpfreeError(f"stage {self.name} is not set up: call rule.setup(total_steps) once before training "
                              "(then rule.train_step(x, y) per batch)")
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

    def held_tensors(self):
        """The tensors this stage keeps from its `step` until its `update` (nested tuples, lists or
        dicts): what a rule without autograd holds between the two, for the activation-memory meter
        (autograd's saved tensors are counted without asking)."""
        return ()

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
    # What the prediction runs through when it is not the network's own forward pass ("": it is, so a
    # module cut with `BlockNet.from_module` predicts as the rule after training; else `as_module()`).
    predicts_through: ClassVar[str] = ""
    # How local the rule is (`bpfree list`, README): what a stage learns from beyond its own input and
    # the labels, and whether a stage must wait for a signal from later stages before it can update.
    locality: ClassVar[str] = ""
    update_locked: ClassVar[bool] = False

    @dataclass
    class Options:
        pass

    def __init__(self, net: BlockNet, options: Optional["Rule.Options"] = None):
        if not isinstance(net, BlockNet):
            raise BpfreeError(f"method {self.name} trains a BlockNet, got {type(net).__name__}: cut your module with "
                              "BlockNet.from_module(model, split_at=[...], head=..., in_shape=...)")
        self.net = net
        if options is None or isinstance(options, dict):          # a dict: its keys are the Options fields
            options = make_options(type(self), options or {})
        elif type(options) is not self.Options:
            raise BpfreeError(f"method {self.name} takes its own options ({type(self).__name__}.Options, a dict, or "
                              f"keywords to create_rule), got {type(options).__qualname__}")
        self.options = check_options(options)
        self.stages = nn.ModuleList(self.build_stages(net, self.options))
        self.precision = "fp32"                        # autocast of inference (and of training, via setup)
        self.memory_format = torch.contiguous_format   # set by `place`
        self.is_setup = False                          # optimizers built (`setup`)

    @abc.abstractmethod
    def build_stages(self, net: BlockNet, options) -> list[Stage]:
        """Cut `net` into stages, adding whatever local machinery the rule needs."""

    def to(self, device) -> "Rule":
        self.stages.to(device)
        return self

    # --- training, in anyone's loop ------------------------------------------------------------
    def setup(self, total_steps: Union[int, Sequence[int]], *, device=None, precision: str = "fp32",
              **optim) -> "Rule":
        """Build every stage's optimizer, per-step schedule (spanning `total_steps`: one number, or one
        per stage) and gradient scaler, and place the stages on `device` (default: where the network's
        parameters are, so aux heads follow the model). `optim`: the optimizer settings of RunConfig
        (optimizer, lr, momentum, weight_decay, lr_schedule), checked as their flags are."""
        if precision not in PRECISIONS:
            raise BpfreeError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        names = {f.name: f.name for f in dataclasses.fields(OptimConfig)} | {"optimizer": "name"}
        unknown = sorted(set(optim) - set(names) - {"name"})
        if unknown:
            raise BpfreeError(f"setup() has no setting {unknown[0]!r}; the optimizer settings are: "
                              f"{', '.join(sorted(set(names) - {'name'}))}")
        cfg = OptimConfig(**{names[k]: v for k, v in optim.items()})
        cfg.validate()
        one = isinstance(total_steps, int) and not isinstance(total_steps, bool)
        steps = [total_steps] * len(self.stages) if one else list(total_steps) if isinstance(total_steps, (list, tuple)) else []
        if (len(steps) != len(self.stages) or not all(isinstance(n, int) and n >= 0 for n in steps)
                or (one and total_steps < 1)):
            raise BpfreeError(f"total_steps must be a positive integer (or one per stage, {len(self.stages)} "
                              f"here; 0 for a stage that does not train), got {total_steps!r}")
        fixed = [s for s in self.stages if precision not in s.precisions]
        if fixed:
            raise BpfreeError(f"method {self.name} trains in {' or '.join(fixed[0].precisions)} only (stage "
                              f"{fixed[0].name}); precision {precision} is not available for it")
        self.place(device if device is not None else next(self.net.parameters()).device)
        self.precision = precision
        for stage, n in zip(self.stages, steps):
            stage.configure(cfg, n, precision)
        self.is_setup = True
        return self

    def train_step(self, x, y: torch.Tensor, *, stages: Optional[Sequence[int]] = None, held=None, link=None,
                   call: Optional[Callable] = None, set_modes: bool = True) -> dict[str, torch.Tensor]:
        """Train on one batch: every stage in `stages` (default all; the others only pass data on, frozen)
        takes its local step bottom-up; top-down rules then send their signal down and update. Returns
        each trained stage's local loss (tensors on the device: no host sync). `x`: a batch of
        normalised inputs (or a message tuple from the stage below, for an executor). The Trainer
        calls this same step with its communicator (`link`), the stages this process holds (`held`)
        and a `call` hook that times them; `set_modes` puts trained stages in train mode, frozen ones
        in eval mode (the Trainer does so once per epoch instead)."""
        if not self.is_setup:
            raise BpfreeError(f"method {self.name}: call rule.setup(total_steps=N, lr=...) before train_step "
                              "(it builds every stage's optimizer and schedule)")
        if not isinstance(x, (torch.Tensor, tuple)) or not isinstance(y, torch.Tensor):
            raise BpfreeError(f"train_step(x, y) takes a batch of tensors, got {type(x).__name__} and "
                              f"{type(y).__name__}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise BpfreeError(f"train_step's labels must be integer classes, got {y.dtype}")
        everything = range(len(self.stages))
        trained = list(everything) if stages is None else list(stages)
        held = list(everything) if held is None else held
        if set_modes:
            for k in held:
                self.stages[k].train(k in trained)
                self.stages[k].requires_grad_(k in trained)
        message = x if isinstance(x, tuple) else (self.inputs(x),)
        train_batch(self.stages, held, trained, message, y.to(message[0].device, torch.int64), link, self.top_down,
                    call)
        return {self.stages[k].name: self.stages[k].stats.last for k in held if k in trained}

    def state_dict(self) -> dict:
        """Every stage's weights and buffers (aux nets included), keyed by stage index."""
        return self.stages.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stages.load_state_dict(state)

    def as_module(self) -> nn.Module:
        """One nn.Module that predicts exactly as `predict` (for export or a user's evaluation code):
        the stages up to the prediction stage, then its readout."""
        return Predictor(self)

    def place(self, device) -> "Rule":
        """Move the stages to `device` in the memory layout this rule trains and predicts in there:
        channels-last for image networks where that is exact (`channels_last_is_exact`; ~1.4x faster
        convolutions on the CPU), inputs converted to it batch by batch (`inputs`)."""
        device = torch.device(device)
        self.stages.to(device)
        images = len(self.net.in_shape) == 3
        self.memory_format = (torch.channels_last if images and channels_last_is_exact(self.stages, device)
                              else torch.contiguous_format)
        if self.memory_format == torch.channels_last:
            self.stages.to(memory_format=torch.channels_last)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.stages.parameters()).device

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of (normalised) inputs on this rule's device, in the layout its stages run in."""
        x = x.to(self.device)
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    @property
    def prediction_stage(self) -> int:
        """The stage whose readout is the prediction; the last by default."""
        return len(self.stages) - 1

    @torch.no_grad()
    def infer(self, message: Message, indices, readouts=None) -> tuple[Message, dict[int, Optional[torch.Tensor]]]:
        """The one inference step, shared by the Trainer's evaluation, `predict` and `evaluate`:
        stages `indices` in order on `message` (under the rule's autocast), and the readouts of those
        in `readouts` (default: all of them)."""
        scores = {}
        with autocast(self.precision, message[0].device):
            for k in indices:
                message = self.stages[k](*message)
                if readouts is None or k in readouts:
                    scores[k] = self.stages[k].readout(message)
        return message, scores

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
        """The prediction's class scores and each stage's own readout, from one pass through the stages
        (the stages' modes as they are)."""
        _, readouts = self.infer((self.inputs(x),), range(len(self.stages)))
        return readouts[self.prediction_stage], [readouts[k] for k in range(len(self.stages))]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
        """Class scores of normalised inputs `x`, in eval mode, batch by batch exactly as the Trainer
        evaluates (same batches, layout and precision, so a loaded run predicts what it recorded)."""
        k = self.prediction_stage
        with evaluating(self.stages):
            return torch.cat([self.infer((self.inputs(x[i:i + batch_size]),), range(k + 1), (k,))[1][k]
                              for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, normalize: Optional[Callable] = None,
                 batch_size: int = EVAL_BATCH) -> tuple[float, list[Optional[float]]]:
        """Accuracy of the prediction and of each stage's own readout on (x, y), in eval mode, with the
        Trainer's arithmetic (`normalize`: e.g. `Data.normalize` for inputs stored as bytes)."""
        if len(y) == 0:
            return float("nan"), []
        correct = torch.zeros(len(self.stages), dtype=torch.int64, device=self.device)
        has, seen = [False] * len(self.stages), 0
        with evaluating(self.stages):
            for i in range(0, len(y), batch_size):
                xb = x[i:i + batch_size]
                _, readouts = self.infer((self.inputs(normalize(xb) if normalize else xb),), range(len(self.stages)))
                labels = y[i:i + batch_size].to(self.device)
                seen += labels.numel()
                for k, scores in readouts.items():
                    if scores is not None:
                        correct[k] += hits(scores, labels)
                        has[k] = True
        accs = [h / seen if r else None for h, r in zip(correct.tolist(), has)]
        return accs[self.prediction_stage], accs

    # --- as a frozen feature extractor (bpfree.transfer): defaults for any rule ----------------
    def feature_stages(self) -> list[Stage]:
        """The stages that extract features, in order: every stage but the last (the one that
        classifies), or the only stage."""
        stages = list(self.stages)
        return stages[:-1] if len(stages) > 1 else stages


class Predictor(nn.Module):
    """A rule's prediction path as one module: `forward(x)` = `rule.predict`'s scores of one batch
    (the stages' modes as they are: call `.eval()` for inference, as with any module)."""

    def __init__(self, rule: Rule):
        super().__init__()
        self.stages = nn.ModuleList(list(rule.stages)[: rule.prediction_stage + 1])
        self.precision = rule.precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        message = (x,)
        with autocast(self.precision, x.device):
            for stage in self.stages:
                message = stage(*message)
            return self.stages[-1].readout(message)


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


def create_rule(name: str, net: BlockNet, options: Optional["Rule.Options"] = None, **kwargs) -> Rule:
    """The rule `name` on `net` (timm's `create_model` for rules): keywords are the rule's Options
    fields, checked as their flags are: `create_rule("dgl", net, aux_head="cnn")`."""
    if not isinstance(name, str):
        raise BpfreeError(f"create_rule needs a rule name (one of: {', '.join(list_rules())}), got {type(name).__name__}")
    cls = get_rule(name)
    if options is not None and kwargs:
        raise BpfreeError("give a rule's options either as an Options object (or a dict) or as keywords, not both")
    return cls(net, options if options is not None else kwargs)


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
