"""One config object per run: every value that defines a run, saved as config.json in its directory.

Each field declares its checks and its command-line flag (`bpfree.options`): `validate()` and
`from_dict` check them, and `bpfree train` / `compare` generate their flags from them.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Optional, Union

from .augment import Augment
from .errors import BpfreeError
from .optim import OptimConfig
from .options import check_fields, option, same_as
from .precision import PRECISIONS
from .rules.base import SCHEDULES

SPLITS = ("even", "balanced")
COMPILE_BACKENDS = ("off", "inductor", "aot_eager")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


LOGS = ("csv", "tensorboard")


@dataclass
class RunConfig:
    method: str = option("backprop", help="learning rule; see `bpfree list`")
    model: str = option("mlp", help="network; see `bpfree list`")
    data: str = option("digits", help="dataset name or npz:PATH")
    blocks: int = option(4, positive=True, help="number of blocks K the model is split into")
    split: Union[str, list[int]] = option(
        "even", choices=SPLITS, metavar="even|balanced|I,J,...",
        help="where blocks start: even unit counts, balanced by measured time (best for --parallel; the "
             "chosen indices are recorded), or the unit indices of blocks 2..K")
    epochs: int = option(10, positive=True, help="epochs, per stage under the sequential schedule")
    stage_epochs: Optional[list[int]] = option(None, positive=True, metavar="N,N,...",
                                               help="sequential schedule: epochs of each stage, e.g. 5,5,2")
    schedule: Optional[str] = option(None, choices=SCHEDULES,
                                     help="override the method's default schedule")
    batch_size: int = option(128, positive=True, help="examples per batch")
    augment: Optional[str] = option(None, metavar="crop=P,flip,cutout=S",
                                    help="augment training batches on the device: any subset of crop=P (pad P "
                                         "pixels, random crop), flip (random horizontal), cutout=S (one SxS "
                                         "square zeroed)")
    optimizer: str = same_as(OptimConfig, "name")
    lr: float = same_as(OptimConfig, "lr")
    momentum: float = same_as(OptimConfig, "momentum")
    weight_decay: float = same_as(OptimConfig, "weight_decay")
    lr_schedule: str = same_as(OptimConfig, "lr_schedule")
    seed: int = option(0, min=0, help="seed of the initialisation, data order and subsets")
    device: str = option("cpu", help="cpu, cuda or cuda:N")
    precision: str = option("fp32", choices=PRECISIONS,
                            help="autocast dtype of each stage's forward pass and local loss (fp16 adds a "
                                 "gradient scaler per stage); parameters and optimizer state stay fp32")
    threads: Optional[int] = option(None, positive=True, help="torch intra-op threads (default: torch's choice)")
    compile: str = option("off", choices=COMPILE_BACKENDS,
                          help="torch.compile each stage's forward pass and local objective: inductor (fast "
                               "kernels; compiling takes a while), aot_eager (traces only: a quick check)")
    stream: bool = option(False, help="image folders larger than memory: decode each batch from the files "
                                      "(with --workers processes) instead of decoding the folder once into memory")
    workers: int = option(0, min=0, help="--stream: DataLoader worker processes decoding batches (0: this process)")
    image_size: Optional[int] = option(None, positive=True, metavar="N",
                                       help="imagefolder data: resize every image to N x N when decoding")
    data_dir: Optional[str] = option(None, help="where dataset files are (else $BPFREE_DATA, system paths, "
                                                "~/.cache/bpfree)")
    train_subset: Optional[int] = option(None, positive=True, metavar="N",
                                         help="train on a seeded random subset of N examples")
    val_split: float = option(0.0, min=0.0, below=1.0, help="fraction of train held out for model selection")
    context: int = option(128, positive=True, metavar="T",
                          help="text data: tokens per training sequence (the model's context)")
    text_split: list[float] = option(default_factory=lambda: [0.9, 0.05, 0.05], metavar="TRAIN,VAL,TEST",
                                     help="text data: fractions of the file, by position, for train, val and test")
    eval_every: Optional[int] = option(None, positive=True, metavar="N",
                                       help="also measure test (and validation) accuracy every N training steps, "
                                            "counted across epochs (metrics.jsonl: each epoch's step_evals)")
    output_labels: Optional[int] = option(
        None, positive=True, metavar="N",
        help="stages that read class labels (e.g. an output layer) train on only N labelled examples per "
             "class; stages learning from pairwise labels see all")
    init_modules: Optional[str] = option(
        None, metavar="RUN_DIR:0-J", help="reuse trained stages 0..J of a finished run, frozen; train only the rest")
    log: Optional[str] = option(None, metavar="csv,tensorboard",
                                help="also log every epoch's metrics to metrics.csv and/or TensorBoard (in the run "
                                     "directory's tensorboard/; needs the tensorboard extra)")
    model_options: dict = option(default_factory=dict, flag="--model-opt", metavar="KEY=VALUE",
                                 help="model builder option, e.g. widths=512,512 (repeatable)")
    rule_options: dict = option(default_factory=dict, cli=False)   # the method's own flags, e.g. --aux-head
    # recorded, not set: SHA-256 of in-memory data's tensors (`train(data=...)`), so runs on different
    # tensors never share a name; None for data loaded by name
    data_sha256: Optional[str] = option(None, cli=False)

    def __post_init__(self) -> None:
        # older config.json files (and --model-opt split=...) keep split among the model options
        if isinstance(self.model_options, dict) and "split" in self.model_options:
            self.model_options = dict(self.model_options)
            self.split = self.model_options.pop("split")

    @property
    def optim(self) -> OptimConfig:
        return OptimConfig(self.optimizer, self.lr, self.momentum, self.weight_decay, self.lr_schedule)

    def validate(self) -> None:
        """Every field's type and metadata (`bpfree.options.check_fields`), then what they cannot say."""
        check_fields(self)
        if self.stage_epochs == []:
            raise BpfreeError("--stage-epochs needs one number of epochs per stage, got none")
        if not _DEVICE.fullmatch(self.device):
            raise BpfreeError(f"unknown device {self.device!r}; choose cpu or cuda[:N]")
        Augment.parse(self.augment)             # one line naming the valid parts
        unknown = sorted(set(self.log.split(",")) - set(LOGS)) if self.log else []
        if unknown:
            raise BpfreeError(f"unknown --log {unknown[0]!r}; choose any of: {', '.join(LOGS)} (comma-separated)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        """A config from a dict (a config.json), refusing unknown keys and values of the wrong type."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise BpfreeError(f"config has unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(names))}")
        cfg = cls(**values)
        check_fields(cfg)
        return cfg

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
        # keys starting with "_" are comments (a recipe's "_source", "_published")
        return cls.from_dict({k: v for k, v in values.items() if not k.startswith("_")})
