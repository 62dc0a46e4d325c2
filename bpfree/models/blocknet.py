"""BlockNet (an ordered list of blocks plus an output head), the shared splitting rule, the registry.

Every builder returns a list of atomic *units* (layer groups that must never be cut, e.g. a
conv-BN-ReLU with its pool, or a residual block) and a head. One shared rule, `split_units`, groups
consecutive units into the K blocks that learning rules train separately.
"""
from __future__ import annotations

import inspect
import numbers
import time
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import BpfreeError, first_line
from ..registry import Registry
from .cut import cut_module
from .modes import evaluating


class BlockNet(nn.Module):
    """An ordered list of blocks plus an output head; learning rules cut training at block boundaries.

    `forward(x)` is `head(blocks[K-1](...blocks[0](x)))`. Each block's output shape is traced once,
    at construction, with a dummy batch in eval mode, so BatchNorm running statistics are untouched.
    The head outputs class scores (num_classes,) per example, or (T, num_classes) per position of an
    input sequence of T tokens (`per_position`: a language model, labels (B, T)).
    """

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module, in_shape: Sequence[int],
                 num_classes: Optional[int] = None):
        super().__init__()
        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            blocks = [blocks]
        if (not isinstance(blocks, (list, tuple, nn.ModuleList, nn.Sequential))
                or not all(isinstance(b, nn.Module) for b in blocks)):
            raise BpfreeError(f"BlockNet(blocks, ...): blocks must be a list of nn.Modules, got {type(blocks).__name__}"
                              " (to cut your own model: BlockNet.from_module)")
        if len(blocks) == 0:
            raise BpfreeError("a BlockNet needs at least one block")
        if not isinstance(head, nn.Module):
            raise BpfreeError(f"BlockNet(blocks, head, ...): head must be an nn.Module that makes the class scores "
                              f"(e.g. nn.Linear(features, classes)), got {type(head).__name__}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
                                        or num_classes < 2):
            raise BpfreeError(f"BlockNet(..., num_classes): an integer >= 2 (default: the head's output width), "
                              f"got {num_classes!r}")
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.in_shape = _check_shape(in_shape)
        self.num_classes = None if num_classes is None else int(num_classes)
        self._block_shapes = self._trace_shapes()
        self.origin: Optional[dict] = None    # from_module: the user's module class, split_at and head

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    @property
    def num_blocks(self) -> int:
        """K, the number of blocks."""
        return len(self.blocks)

    def block_shapes(self) -> list[tuple[int, ...]]:
        """Output shape of each block, without the batch dimension."""
        return list(self._block_shapes)

    @torch.no_grad()
    def _trace_shapes(self) -> list[tuple[int, ...]]:
        # Eval mode so BatchNorm uses (and does not update) its running statistics; batch of 2
        # because some layers refuse a batch of 1 in train mode. Modes are restored per module,
        # so a net built from partly frozen user modules keeps its mix.
        shapes, x = [], torch.zeros(2, *self.in_shape)
        with evaluating(self):
            try:
                for block in self.blocks:
                    x = block(x)
                    shapes.append(tuple(x.shape[1:]))
                out = self.head(x)
            except RuntimeError as e:
                raise BpfreeError(f"network does not accept input of shape {self.in_shape}: "
                                  f"{first_line(e)}") from None
        # class scores per example (num_classes,), or per position of a sequence (T, num_classes): a
        # language model's next-token scores, with labels (B, T)
        self.per_position = out.dim() == 3 and len(self.in_shape) == 1 and out.shape[1] == self.in_shape[0]
        if self.num_classes is None and out.dim() == 2 + self.per_position:
            self.num_classes = int(out.shape[-1])
        if tuple(out.shape) != (2, self.num_classes) and not (self.per_position and out.shape[2] == self.num_classes):
            raise BpfreeError(f"the head outputs shape {tuple(out.shape[1:])}, expected "
                              f"({self.num_classes or 'num_classes'},): class scores per example")
        if self.num_classes < 2:
            raise BpfreeError(f"the head outputs {self.num_classes} score per example; a classifier needs two or more")
        return shapes

    @classmethod
    def from_module(cls, model: nn.Module, split_at: Sequence[str], head: str, in_shape: Sequence[int],
                    num_classes: Optional[int] = None) -> "BlockNet":
        """Cut any module after the submodules named in `split_at` (dotted paths): a ResNet's
        ["layer1", "layer2"] gives blocks stem..layer1, layer2, and layer3..layer4 (the last block runs
        to the last layer with weights before the head). `head` names the submodule that makes the
        class scores; the code `forward` runs before it without weights (pooling, flatten) goes with it. The model's own forward code is
        kept (a torch.fx graph, see `models.cut`), and the blocks share the model's parameters: after
        training, `model.state_dict()` holds the trained weights. `num_classes`: default, the head's
        output width."""
        blocks, head_module = cut_module(model, split_at, head)
        net = cls(blocks, head_module, in_shape, num_classes)
        net.origin = {"module": type(model).__name__, "split_at": [split_at] if isinstance(split_at, str)
                      else list(split_at), "head": head}
        return net

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, split_points: Sequence[int], head: nn.Module,
                        in_shape: Sequence[int], num_classes: int) -> "BlockNet":
        """Cut a user's nn.Sequential before the given layer indices: [2, 5] -> seq[0:2], seq[2:5], seq[5:]
        (`from_module` on the sequence followed by `head`)."""
        if not isinstance(seq, nn.Sequential):
            raise BpfreeError(f"from_sequential needs an nn.Sequential, got {type(seq).__name__}")
        starts = _check_starts(split_points, len(seq),
                               f"split points for an nn.Sequential of {len(seq)} layers")
        whole = nn.Sequential(*seq, head)
        return cls.from_module(whole, [str(p - 1) for p in starts] + [str(len(seq) - 1)], str(len(seq)),
                               in_shape, num_classes)


@torch.no_grad()
def split_units(units: Sequence[nn.Module], k: int, split: Union[None, str, int, Sequence[int]] = None,
                model: str = "model") -> list[nn.Sequential]:
    """Group consecutive units into k blocks (an nn.Sequential each).

    split=None or "even": block sizes as equal as possible; when they cannot be equal the extra
    units go to the *later* blocks, because early units see the largest feature maps and already
    dominate a block's activation memory (8 units, K=3 -> 2, 3, 3).
    split=[i, j, ...]: the unit indices where blocks 2..k start (k-1 strictly increasing indices).
    ("balanced", by measured time, is resolved to indices before a run: see `balanced_split`.)
    """
    n = len(units)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise BpfreeError(f"model {model} allows 1..{n} blocks, got {k}")
    if split is None or split == "even":
        base, extra = divmod(n, k)
        sizes = [base + (i >= k - extra) for i in range(k)]
        starts = [sum(sizes[:i]) for i in range(1, k)]
    elif isinstance(split, str):
        raise BpfreeError(f"split for model {model} must be 'even' or a list of unit indices, got {split!r}")
    else:
        what = f"split for {k} blocks of model {model} ({n} units)"
        starts = _check_starts([split] if isinstance(split, int) else split, n, what)
        if len(starts) != k - 1:
            raise BpfreeError(f"{what} needs {k - 1} unit indices, got {list(starts)}")
    bounds = [0] + starts + [n]
    return [nn.Sequential(*units[a:b]) for a, b in zip(bounds, bounds[1:])]


def _check_starts(points, n: int, what: str) -> list[int]:
    # Block start indices: integers, strictly increasing, inside 1..n-1 (no empty block).
    given = points
    try:
        points = list(points)
    except TypeError:
        points = None
    ok = points is not None and all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < n for p in points)
    if not ok or points != sorted(set(points)):
        raise BpfreeError(f"{what} must be strictly increasing integers in 1..{n - 1}, got {given!r}")
    return points


def _check_shape(in_shape) -> tuple[int, ...]:
    shape = tuple(in_shape) if isinstance(in_shape, (tuple, list, torch.Size)) else in_shape
    if (not isinstance(shape, tuple) or not shape
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise BpfreeError(f"input shape must be positive integers like (C, H, W) or (D,), got {shape!r}")
    return tuple(int(s) for s in shape)


# --- registry ------------------------------------------------------------------------------------
# name -> builder, a function fn(num_classes, in_shape, **options) -> (units, head).
_MODELS: Registry[Callable] = Registry("model")


def register_model(name: str, description: str):
    """Decorator registering a builder `fn(num_classes, in_shape, **options) -> (units, head)`."""
    def wrap(builder):
        return _MODELS.register(name, builder, description)
    return wrap


def list_models(pattern: Optional[str] = None) -> dict[str, str]:
    """Registered model names (those matching a shell-style `pattern`, e.g. "resnet*") -> descriptions."""
    return _MODELS.describe(pattern)


def _build(name: str, num_classes: int, in_shape, options: dict) -> tuple[list[nn.Module], nn.Module]:
    builder = _MODELS.get(name)
    valid = [p for p in inspect.signature(builder).parameters if p not in ("num_classes", "in_shape")]
    bad = sorted(set(options) - set(valid))
    if bad:
        raise BpfreeError(f"model {name} has no option {bad[0]!r}; its options: {', '.join(valid + ['split'])}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise BpfreeError(f"num_classes must be a positive integer, got {num_classes!r}")
    units, head = builder(num_classes, _check_shape(in_shape), **options)
    return list(units), head


def create_model(name: str, num_classes: int, in_shape: Sequence[int], blocks: int = 4,
                 split: Union[None, str, int, Sequence[int]] = None, **kwargs) -> BlockNet:
    """Build a registered model split into `blocks` blocks.

    `split`: "even" (default) or the unit indices where blocks 2..K start (see `split_units`;
    resolve "balanced" with `balanced_split` first). kwargs are the builder's own options (see
    `bpfree list`).
    """
    units, head = _build(name, num_classes, in_shape, kwargs)
    return BlockNet(split_units(units, blocks, split, model=name), head, in_shape, num_classes)


def partition(costs: Sequence[float], k: int) -> list[list[int]]:
    """Split items 0..n-1 into k contiguous non-empty groups minimising the largest group cost (exact DP)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[r][i]: the smallest largest-cost of items 0..i-1 in r groups; cut[r][i]: where the last group starts
    best = [[float("inf")] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for r in range(1, k + 1):
        for i in range(r, n + 1):
            for j in range(r - 1, i):
                value = max(best[r - 1][j], prefix[i] - prefix[j])
                if value < best[r][i]:
                    best[r][i], cut[r][i] = value, j
    groups, i = [], n
    for r in range(k, 0, -1):
        groups.append(list(range(cut[r][i], i)))
        i = cut[r][i]
    return groups[::-1]


def balanced_split(name: str, num_classes: int, in_shape: Sequence[int], blocks: int, batch: int = 64,
                   **kwargs) -> list[int]:
    """Unit indices where blocks 2..K start, so that the slowest block trains fastest.

    Each unit's forward + backward time is measured on a random probe batch (this machine, the
    current thread count), and the units are grouped by `partition`. Block-parallel training runs
    at the pace of its slowest block, so an even split by unit count can cap the speedup. Timings
    vary between runs: resolve the split once and record the indices (the trainer does).
    """
    with torch.random.fork_rng(devices=[]):       # leave the global RNG as it was
        units, _ = _build(name, num_classes, in_shape, kwargs)
        split_units(units, blocks, model=name)     # checks K against the number of units
        x = torch.randn(batch, *in_shape)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        costs = []
        for unit in units:
            unit = unit.to(memory_format=torch.channels_last) if x.dim() == 4 else unit
            x = x.detach().requires_grad_()
            elapsed = []
            for _ in range(3):
                begin = time.perf_counter()
                y = unit(x)
                y.float().square().mean().backward()
                elapsed.append(time.perf_counter() - begin)
            costs.append(min(elapsed[1:]))      # the first call pays one-off set-up costs
            x = y
    return [group[0] for group in partition(costs, blocks)[1:]]


def max_blocks(name: str, in_shape: Sequence[int], **kwargs) -> int:
    """How many blocks the architecture allows (its number of units) for these options."""
    units, _ = _build(name, 2, in_shape, kwargs)
    return len(units)


def require_image(name: str, in_shape: tuple[int, ...]) -> None:
    """Builders call this first: image models need (C,H,W) input."""
    if len(in_shape) != 3:
        raise BpfreeError(f"model {name} needs image input (C,H,W); data has shape {tuple(in_shape)}")
