"""The dataset the engine trains on: `Data` (splits as tensors, or a user's loaders), its per-batch
normalisation, and the batches of stored inputs. Loading and checking files is `bpfree.data`'s.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .errors import BpfreeError


@dataclass
class Data:
    """A dataset ready for training: inputs and int64 labels per split, and the normalisation.

    Inputs are uint8 (N, C, H, W) for datasets stored as bytes, to be normalised per batch with
    `normalize`; otherwise float32, (N, C, H, W) or (N, D), already normalised at load. `mean` and
    `std` are the training split's statistics (float32, shaped to broadcast over a batch: (1, C, 1, 1)
    or (1, 1)), computed in float64 as `load_data` always has.
    """
    name: str
    x_train: torch.Tensor      # uint8 (N, C, H, W) or float32 normalised (N, C, H, W) / (N, D)
    y_train: torch.Tensor      # int64 in 0..num_classes-1
    x_val: torch.Tensor        # held out from train; may have 0 rows
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_shape: tuple[int, ...]
    classes: list[str] | None = None
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    loaders: "Loaders | None" = None   # batches come from these iterables instead (`from_loaders`)
    has_inputs: bool = dataclasses.field(default=True, repr=False)   # False: inputs cut, labels kept (`labels_only`)

    def __post_init__(self) -> None:
        """The checks every dataset passes, whoever built it (the file loaders run the same ones on
        their arrays first): one line naming the problem, never a silently wrong run."""
        if not isinstance(self.name, str) or not self.name:
            raise BpfreeError(f"Data: name must be a non-empty string, got {self.name!r}")
        where = f"Data {self.name!r}"
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise BpfreeError(f"{where}: num_classes must be an integer >= 2, got {self.num_classes!r}")
        if (not isinstance(self.in_shape, (tuple, list)) or not self.in_shape
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in self.in_shape)):
            raise BpfreeError(f"{where}: in_shape must be a tuple of positive integers, e.g. (1, 28, 28), got "
                              f"{self.in_shape!r}")
        self.in_shape = tuple(self.in_shape)
        check_image_layout(self.in_shape, where)
        if self.loaders is not None:         # a user's iterables: `Loaders.check` has read their first batch
            return
        for split in ("train", "val", "test"):
            self._check_split(split, where)
        if self.mean is None and any(getattr(x, "dtype", None) == torch.uint8 for x in (self.x_train, self.x_test)):
            raise BpfreeError(f"{where}: uint8 inputs are normalised per batch and need mean and std (the training "
                              "split's statistics); give them, or float inputs already normalised")
        train, test = torch.unique(self.y_train), torch.unique(self.y_test)
        if len(self.y_train) == 0 or len(self.y_test) == 0:
            raise BpfreeError(f"{where}: the {'train' if len(self.y_train) == 0 else 'test'} split is empty")
        labels = torch.cat([train, test, torch.unique(self.y_val)])
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            raise BpfreeError(f"{where}: label {lo if lo < 0 else hi} is out of range; labels must be "
                              f"0..{self.num_classes - 1} (num_classes {self.num_classes})"
                              + ("; labels 1..C? subtract 1" if lo == 1 or hi == self.num_classes else ""))
        check_classes(where, train.tolist(), test.tolist())

    def _check_split(self, split: str, where: str) -> None:
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        if not isinstance(y, torch.Tensor) or y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
            got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
            raise BpfreeError(f"{where}: y_{split} must be a tensor of integer labels 0..C-1, got {got}")
        if y.dim() != 1:
            raise BpfreeError(f"{where}: y_{split} has shape {tuple(y.shape)}; expected one label per example")
        if y.dtype != torch.int64:                     # int32, uint8, ... labels: the loss reads int64
            setattr(self, f"y_{split}", y.long())
        if not isinstance(x, torch.Tensor) and not hasattr(x, "subset"):      # tensors, or streamed image files
            raise BpfreeError(f"{where}: x_{split} must be a torch tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.in_shape:
            raise BpfreeError(f"{where}: x_{split} holds examples of shape {tuple(x.shape[1:])}, but in_shape is "
                              f"{self.in_shape}")
        if self.has_inputs and len(x) != len(y):
            raise BpfreeError(f"{where}: x_{split} has {len(x)} rows but y_{split} has {len(y)} labels")
        dtype = x.dtype
        if not (dtype == torch.uint8 or dtype.is_floating_point or (len(self.in_shape) == 1 and dtype != torch.bool)):
            raise BpfreeError(f"{where}: x_{split} has dtype {dtype}; inputs are uint8 images (normalised per batch "
                              "with mean and std), float (normalised), or integer token ids N x T")

    @classmethod
    def from_loaders(cls, train_loader, test_loader, num_classes: int | None = None, val_loader=None, *,
                     name: str | None = None, steps_per_epoch: int | None = None) -> "Data":
        """Data from any iterables of (x, y) batches (e.g. torch DataLoaders): the Trainer iterates
        `train_loader` once per epoch and evaluates on `test_loader` (and `val_loader`). Inputs arrive as
        the network reads them (your transforms normalise and augment); labels are integers 0..C-1.
        `num_classes`: default, `train_loader.dataset.classes` if it has them, else one more than the
        largest test label. `steps_per_epoch`: for a loader without a length. Resume is exact when
        the order is seeded: a DataLoader over a map-style dataset, shuffled by its `generator` or by
        torch's global RNG (both saved in checkpoints) or not shuffled, its transforms drawing from
        torch's RNG; other iterables train, but `--resume` is refused for them."""
        loaders = Loaders.check(train_loader, test_loader, val_loader, steps_per_epoch)
        x, _ = loaders.probe
        if num_classes is None:
            num_classes = loaders.infer_classes()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise BpfreeError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        in_shape = tuple(int(s) for s in x.shape[1:])
        empty = torch.zeros(0, *in_shape)
        labels = torch.zeros(0, dtype=torch.int64)
        return cls(name or f"loaders:{type(getattr(train_loader, 'dataset', train_loader)).__name__}",
                   empty, labels, empty, labels, empty, labels, num_classes, in_shape, loaders=loaders)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of inputs as the network reads them: float32, normalised, same memory format.

        uint8 rows become exactly (bit for bit) what normalising the whole split at load gave before
        inputs were stored as bytes: level v -> float32(v) / 255 (a 256-entry table computed on the
        CPU by that same code, so every device gives the same values), then `- mean`, `/ std` in
        float32. Float inputs were normalised at load and are returned unchanged.
        """
        if x.dtype != torch.uint8:
            return x
        if self.mean is None or self.std is None:
            raise BpfreeError(f"{self.name}: uint8 inputs need Data.mean and Data.std to be normalised")
        return _levels(x.device)[x.long()].sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def normalized(self) -> "Data":
        """This dataset with every split normalised to float32 (as `load_data` returned before inputs
        were stored as bytes): 4x the memory of uint8 images, for code that wants whole tensors."""
        return dataclasses.replace(self, x_train=self.normalize(self.x_train), x_val=self.normalize(self.x_val),
                                   x_test=self.normalize(self.x_test))

    def labels_only(self) -> "Data":
        """What a rank that does not read the data needs: labels, sizes and shapes (inputs cut to 0 rows)."""
        return dataclasses.replace(self, x_train=self.x_train[:0], x_val=self.x_val[:0], x_test=self.x_test[:0],
                                   has_inputs=False)

    def fingerprint(self) -> str | None:
        """SHA-256 of every split's inputs and labels (None for a user's loaders or streamed files):
        what a run on in-memory data records, so that runs on different tensors never share a name."""
        if self.loaders is not None or not all(isinstance(x, torch.Tensor) for x in (self.x_train, self.x_test)):
            return None
        digest = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
            t = t.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()


@dataclass
class Loaders:
    """A user's iterables of (x, y) batches, checked once: `steps` training batches per epoch, `probe`
    the first test batch (shapes, and the placement probe of a parallel run)."""
    train: object
    test: object
    val: object | None
    steps: int
    probe: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def check(cls, train, test, val, steps_per_epoch) -> "Loaders":
        for what, loader in (("train_loader", train), ("test_loader", test), ("val_loader", val)):
            if loader is None and what == "val_loader":
                continue
            if isinstance(loader, (torch.Tensor, np.ndarray, Data)) or not hasattr(loader, "__iter__"):
                raise BpfreeError(f"Data.from_loaders: {what} must be an iterable of (x, y) batches such as a "
                                  f"torch DataLoader, got {type(loader).__name__}")
        if steps_per_epoch is None:
            try:
                steps_per_epoch = len(train)
            except TypeError:
                raise BpfreeError("Data.from_loaders: train_loader has no length; give steps_per_epoch "
                                  "(the batches in one epoch)") from None
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise BpfreeError(f"Data.from_loaders: steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
        return cls(train, test, val, steps_per_epoch, batch_of(next(iter(test), None), "test_loader"))

    def infer_classes(self) -> int:
        classes = getattr(getattr(self.train, "dataset", None), "classes", None)
        if classes is not None:
            return len(classes)
        return 1 + max(int(batch_of(b, "test_loader")[1].max()) for b in self.test)

    def exact_order(self) -> str | None:
        """None when a resumed run sees the batches an uninterrupted one would; else why not."""
        from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler
        for what, loader in (("train_loader", self.train), ("val_loader", self.val), ("test_loader", self.test)):
            if loader is None or getattr(loader, "resumable", False):   # e.g. text windows: a saved generator
                continue
            if not isinstance(loader, DataLoader):
                return f"{what} is a {type(loader).__name__}, not a torch DataLoader: its order cannot be restored"
            if isinstance(loader.dataset, IterableDataset):
                return f"{what} reads an IterableDataset, whose order bpfree cannot restore"
            sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
            if not isinstance(sampler, (RandomSampler, SequentialSampler)):
                return f"{what} uses a {type(sampler).__name__}, whose state bpfree cannot save"
        return None

    def generators(self) -> list:
        """The torch.Generators that order the loaders' batches (saved in checkpoints)."""
        found = []
        for loader in (self.train, self.val, self.test):
            for g in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)):
                if isinstance(g, torch.Generator) and all(g is not f for f in found):
                    found.append(g)
        return found


def check_image_layout(shape: tuple[int, ...], where: str) -> None:
    """One line when images of `shape` (C, H, W) look stored channels-last (H, W, C): more "channels"
    than pixels along a side."""
    if len(shape) == 3 and shape[0] > min(shape[1:]):
        c, h, w = shape
        raise BpfreeError(f"{where}: images of shape {tuple(shape)} would be read as {c} channels of {h}x{w}; "
                          "images are C x H x W: if yours are N x H x W x C (channels last), transpose them "
                          "(numpy x.transpose(0, 3, 1, 2), torch x.permute(0, 3, 1, 2))")


def check_classes(where: str, train: list[int], test: list[int]) -> None:
    """One line unless the training split has two classes or more and every test class among them."""
    if len(set(train)) < 2:
        raise BpfreeError(f"{where}: the training split holds a single class ({train[0] if train else '-'}); "
                          "a classifier needs two or more")
    unseen = sorted(set(test) - set(train))
    if unseen:   # a class the model never trains on: its test examples would silently count as errors
        more = f" (and {len(unseen) - 1} more)" if len(unseen) > 1 else ""
        raise BpfreeError(f"{where}: test label {unseen[0]}{more} never occurs in the training split; "
                          "every test class needs training examples")


def batch_of(batch, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's batch as (float inputs, int64 labels), or one line saying what it is instead."""
    if batch is None:
        raise BpfreeError(f"Data.from_loaders: {what} yields no batches")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not all(isinstance(t, torch.Tensor) for t in batch):
        raise BpfreeError(f"Data.from_loaders: {what} must yield (x, y) pairs of tensors, got "
                          f"{type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    x, y = batch
    tokens = not x.is_floating_point() and x.dtype != torch.bool and x.dim() == 2     # (N, T) token ids
    if not tokens and (not x.is_floating_point() or x.dim() not in (2, 4)):
        raise BpfreeError(f"Data.from_loaders: {what}'s inputs must be float N x D or N x C x H x W (normalised "
                          f"by your transforms) or integer token ids N x T, got {x.dtype} of shape {tuple(x.shape)}")
    per_position = tokens and tuple(y.shape) == tuple(x.shape)          # a language model's next tokens
    if (y.dtype == torch.bool or y.is_floating_point() or y.is_complex()
            or not (per_position or (y.dim() == 1 and len(y) == len(x)))):
        raise BpfreeError(f"Data.from_loaders: {what}'s labels must be one integer class per example (or per "
                          f"token), got {y.dtype} of shape {tuple(y.shape)} for inputs {tuple(x.shape)}")
    return x, y.long()


_LEVELS: dict[str, torch.Tensor] = {}


def _levels(device: torch.device) -> torch.Tensor:
    """float32(v) / 255 for the 256 byte values, on `device` (copied there once per process)."""
    key = str(device)
    if key not in _LEVELS:
        if "cpu" not in _LEVELS:
            _LEVELS["cpu"] = to_float(np.arange(256, dtype=np.uint8))
        _LEVELS[key] = _LEVELS["cpu"].to(device)
    return _LEVELS[key]


def to_float(x: np.ndarray) -> torch.Tensor:
    # Always a fresh writable copy, so normalising in place never touches the loader's arrays.
    out = torch.from_numpy(x.astype(np.float32, order="C"))
    return out.div_(255.0) if x.dtype == np.uint8 else out



def batches_of(x, index_batches, *, workers: int = 0, device="cpu"):
    """The stored inputs of each batch of indices (index tensors or slices), in order, on `device`:
    indexed in memory, or, for inputs streamed from files, decoded by `workers` DataLoader processes
    (0: in this process), a whole batch per fetch, pinned for a non-blocking copy to a GPU."""
    if isinstance(x, torch.Tensor):
        return (x[idx] for idx in index_batches)
    from torch.utils.data import DataLoader
    lists = [list(range(*idx.indices(len(x)))) if isinstance(idx, slice) else idx.tolist() for idx in index_batches]
    device = torch.device(device)
    loader = DataLoader(x, sampler=lists, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda")
    return (b.to(device, non_blocking=True) for b in loader)
