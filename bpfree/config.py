"""One config object per run: every value that defines a run, saved as config.json in its directory."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from .errors import BpfreeError
from .optim import OptimConfig


@dataclass
class RunConfig:
    method: str = "backprop"
    model: str = "mlp"
    data: str = "digits"
    blocks: int = 4
    epochs: int = 10                       # per stage under the sequential schedule
    stage_epochs: Optional[list[int]] = None  # sequential only: epochs of each stage
    schedule: Optional[str] = None         # None: the rule's default
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    seed: int = 0
    device: str = "cpu"
    threads: Optional[int] = None
    data_dir: Optional[str] = None
    train_subset: Optional[int] = None
    val_split: float = 0.0
    output_labels: Optional[int] = None   # labelled examples per class for stages that need class labels
    init_modules: Optional[str] = None    # "RUN_DIR:0-1": reuse (and freeze) trained stages of another run
    model_options: dict = field(default_factory=dict)
    rule_options: dict = field(default_factory=dict)

    @property
    def optim(self) -> OptimConfig:
        return OptimConfig(self.optimizer, self.lr, self.momentum, self.weight_decay, self.lr_schedule)

    def validate(self) -> None:
        if self.epochs <= 0:
            raise BpfreeError(f"--epochs must be a positive integer, got {self.epochs}")
        if self.stage_epochs is not None and (not self.stage_epochs or min(self.stage_epochs) <= 0):
            raise BpfreeError(f"--stage-epochs must be positive integers, got {self.stage_epochs}")
        if self.batch_size <= 0:
            raise BpfreeError(f"--batch-size must be a positive integer, got {self.batch_size}")
        if self.blocks <= 0:
            raise BpfreeError(f"--blocks must be a positive integer, got {self.blocks}")
        if self.output_labels is not None and self.output_labels <= 0:
            raise BpfreeError(f"--output-labels must be a positive integer, got {self.output_labels}")
        if self.threads is not None and self.threads <= 0:
            raise BpfreeError(f"--threads must be a positive integer, got {self.threads}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise BpfreeError(f"unknown device {self.device!r}; choose cpu or cuda[:N]")
        self.optim.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise BpfreeError(f"config has unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(names))}")
        return cls(**values)

    @classmethod
    def load(cls, path) -> "RunConfig":
        try:
            with open(path) as f:
                values = json.load(f)
        except FileNotFoundError:
            raise BpfreeError(f"config file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BpfreeError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise BpfreeError(f"config file {path} must hold a JSON object")
        return cls.from_dict(values)
