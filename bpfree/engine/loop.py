"""The Trainer: the one training loop, for one process or one rank of many.

It knows the stage protocol only (`configure`, `step`, `forward`, `readout`, `stats`, and for
top-down rules `feedback` / `update`), never a particular rule, and no distributed code: what
differs between one process and W ranks (which stages are held here, where a batch comes from
and its message goes, the collectives) is its communicator's business (`engine.comm`). Two
schedules:

* simultaneous: every stage steps on every batch; stage k+1 learns from stage k's current output.
* sequential: stage k trains for its epochs, is frozen, then stage k+1 starts (strictly modular).
  A frozen prefix is deterministic, so in one process its outputs on the training set are
  computed once per stage and cached when they fit in memory. (Only one process can: the
  sequential schedule is the one a pipeline refuses.)

Per epoch: train every batch (`Rule.train_step`, the step a user's own loop calls too), evaluate the prediction and every
stage's readout on test and validation, append a metrics row, write an atomic checkpoint.
With `eval_every` N, the prediction is also evaluated after every N-th training step (counted
across epochs) inside an epoch; those records travel in the epoch's row (`step_evals`), so they
are saved and resumed with it, and they leave training exactly as it was.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ..augment import Augment
from ..config import RunConfig
from ..dataset import Data, batch_of, batches_of
from ..errors import BpfreeError, first_line
from ..io import load_checkpoint, load_weights, parse_module_spec, provenance, save_checkpoint, save_weights
from ..memory import CudaPeak, saved_activation_bytes, tensor_bytes
from ..models.modes import evaluating
from ..precision import autocast
from ..rules import SCHEDULES, Rule
from ..rules.base import EVAL_BATCH, class_loss, hits
from .comm import LocalComm
from .placement import stage_costs

CACHE_LIMIT_BYTES = 2 << 30   # cache a frozen prefix's outputs when they take less than this


class DivergedError(BpfreeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3


@dataclass
class Phase:
    """A run of epochs during which the same stages are trained."""

    stages: list[int]    # indices of the stages that step
    epochs: int
    rows: Optional[torch.Tensor] = None   # training examples used (None: all), see --output-labels


def plan_phases(rule: Rule, cfg: RunConfig, reused: int = 0) -> tuple[str, list[Phase]]:
    """The phases of training; the first `reused` stages come trained and are never stepped."""
    schedule = cfg.schedule or rule.default_schedule
    if schedule not in SCHEDULES:
        raise BpfreeError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if schedule not in rule.schedules:
        raise BpfreeError(f"method {rule.name} does not support the {schedule} schedule; "
                          f"it supports: {', '.join(rule.schedules)}")
    trained = list(range(reused, len(rule.stages)))
    if schedule == "simultaneous":
        if cfg.stage_epochs is not None:
            raise BpfreeError("--stage-epochs applies only to the sequential schedule")
        return schedule, [Phase(trained, cfg.epochs)]
    epochs = cfg.stage_epochs or [cfg.epochs] * len(trained)
    if len(epochs) != len(trained):
        raise BpfreeError(f"--stage-epochs needs one value per trained stage ({len(trained)}), got {len(epochs)}")
    return schedule, [Phase([k], e) for k, e in zip(trained, epochs)]


def check_inputs(rule: Rule, data: Data, cfg: RunConfig) -> None:
    """One line unless the rule, the data and the config are what a run needs and agree: the config
    names the rule's method, the network reads the data's inputs and scores its classes."""
    from torch.utils.data import DataLoader
    if not isinstance(rule, Rule):
        hint = (" (cut your module with BlockNet.from_module, then bpfree.create_rule(name, net))"
                if isinstance(rule, nn.Module) else " (bpfree.create_rule(name, net))")
        raise BpfreeError(f"Trainer needs a bpfree Rule{hint}, got {type(rule).__name__}")
    if not isinstance(data, Data):
        hint = "Data.from_loaders(train_loader, test_loader)" if isinstance(data, DataLoader) else "bpfree.load_data(name)"
        raise BpfreeError(f"Trainer needs a bpfree Data ({hint}), got {type(data).__name__}")
    if not isinstance(cfg, RunConfig):
        raise BpfreeError(f"Trainer needs a RunConfig (RunConfig(**settings) from a dict), got {type(cfg).__name__}")
    if cfg.method != rule.name:
        raise BpfreeError(f"the config says method {cfg.method!r} but the rule given is {rule.name!r}: the run's "
                          f"records would name the wrong rule; use RunConfig(method={rule.name!r}, ...)")
    net = rule.net
    if tuple(net.in_shape) != tuple(data.in_shape):
        raise BpfreeError(f"the network reads inputs of shape {tuple(net.in_shape)} but the data {data.name!r} has "
                          f"{tuple(data.in_shape)}; build the network for the data's shape")
    if net.num_classes != data.num_classes:
        raise BpfreeError(f"the network scores {net.num_classes} classes but the data {data.name!r} has "
                          f"{data.num_classes}; build the network with num_classes={data.num_classes}")


def _freeze(stage) -> None:
    stage.eval()
    stage.requires_grad_(False)


class Trainer:
    """Fits a rule on a dataset, writing metrics and checkpoints to `run` (optional: a run directory,
    `bpfree.runs.RunDir`, which the session layer opens). `comm`: the world this process trains in
    (default: one process holding every stage)."""

    def __init__(self, rule: Rule, data: Data, cfg: RunConfig, run=None,
                 quiet: bool = False, on_epoch: Optional[Callable[[dict], None]] = None,
                 comm: Optional[LocalComm] = None, progress_s: Optional[float] = 60.0):
        check_inputs(rule, data, cfg)
        self.augment = Augment.parse(cfg.augment)
        self.augment.check(data.in_shape)
        self.comm = comm = comm or LocalComm()
        self.device = torch.device(cfg.device)
        self.rule, self.cfg, self.run = rule.place(self.device), cfg, run
        rule.precision = cfg.precision
        self.data = _place(data, self.device, rule.memory_format)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True   # fastest conv algorithms for these fixed shapes
        self.quiet = quiet or not comm.is_main or not sys.stderr.isatty()
        # no terminal for a progress bar (nohup, SLURM): a line every `progress_s` seconds instead
        self.progress_s = None if quiet or not comm.is_main or sys.stderr.isatty() else progress_s
        self.on_epoch = on_epoch if comm.is_main else None
        self.reused = self._reuse(cfg.init_modules) if cfg.init_modules else 0
        self.schedule, self.phases = plan_phases(rule, cfg, self.reused)
        comm.check(rule, self.schedule)
        self.loaders = data.loaders
        if self.loaders is not None and (cfg.output_labels or cfg.augment):
            raise BpfreeError(f"--{'output-labels' if cfg.output_labels else 'augment'} works on bpfree's stored "
                              "datasets; with your own loaders, choose the examples or augment in their Dataset")
        if cfg.output_labels:
            self._restrict_labels(cfg.output_labels)
        optim = cfg.optim
        rule.setup(self._stage_steps(), device=self.device, precision=cfg.precision, optimizer=optim.name, lr=optim.lr,
                   momentum=optim.momentum, weight_decay=optim.weight_decay, lr_schedule=optim.lr_schedule)
        bs = min(cfg.batch_size, len(self.data.y_train))
        if bs == 1 and self.loaders is None and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                    for m in rule.stages.modules()):
            raise BpfreeError("--batch-size 1 cannot train BatchNorm layers (their batch statistics need two or "
                              f"more examples), and method {rule.name} on this network has some; use --batch-size 2 "
                              "or more")
        probe_x, probe_y = (self.data.normalize(self.data.x_train[:bs]), self.data.y_train[:bs]) if self.loaders is None \
            else self.loaders.probe
        self.held = comm.place(len(rule.stages), lambda: stage_costs(
            rule.stages, self.phases[0].stages, rule.inputs(probe_x), probe_y.to(self.device), rule.top_down),
            self.device)
        if cfg.compile != "off":       # after placement, which times copies of the plain stages
            for stage in rule.stages:
                stage.compile_for(cfg.compile)
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        # training batches only, on the device, from the run's own generator (saved with checkpoints)
        self.augment_rng = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.rows: list[dict] = []
        self.train_time = 0.0
        self.activation_bytes = [0] * len(rule.stages)
        self.flops: list[Optional[int]] = [None] * len(rule.stages)   # one training step's, per stage
        self._counting: set[int] = set()          # stages whose FLOPs this batch counts
        self.cuda = CudaPeak(self.device)
        self.cuda_step_bytes: list[Optional[int]] = [None] * len(rule.stages)
        self._measuring = False

    def _reuse(self, spec: str) -> int:
        """Load trained stages 0..j of another run, frozen: only the stages after them train."""
        source, indices = parse_module_spec(spec)
        n = len(self.rule.stages)
        if indices != list(range(len(indices))) or len(indices) >= n:
            raise BpfreeError(f"--init-modules reuses a prefix of the stages, 0-J with J < {n - 1} "
                              f"(this rule has {n} stages), got {spec!r}")
        load_weights(source / "model.safetensors", self.rule.stages, indices)
        for k in indices:
            _freeze(self.rule.stages[k])
        return len(indices)

    def steps(self, phase: Phase) -> int:
        if self.loaders is not None:
            return self.loaders.steps
        n = len(self.data.y_train) if phase.rows is None else len(phase.rows)
        return max(1, n // self.cfg.batch_size)

    def _restrict_labels(self, per_class: int) -> None:
        """Stages that read class identities train on `per_class` seeded examples of each class."""
        y = self.data.y_train.cpu()
        gen = torch.Generator().manual_seed(self.cfg.seed)
        picks = []
        for c in range(self.data.num_classes):
            members = (y == c).nonzero().flatten()
            if len(members) < per_class:
                raise BpfreeError(f"--output-labels {per_class} needs {per_class} training examples of every "
                                  f"class; class {c} has {len(members)}")
            picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
        labelled = torch.cat(picks).sort().values.to(self.device)
        for phase in self.phases:
            readers = [self.rule.stages[k].uses_class_labels for k in phase.stages]
            if all(readers):
                phase.rows = labelled
            elif any(readers):
                raise BpfreeError(f"--output-labels needs stages that read class labels to train apart from those "
                                  f"that do not; use --schedule sequential with method {self.rule.name}")

    # --- checkpoints -----------------------------------------------------------------------
    def _save(self) -> None:
        """Gather every stage's training state on the main rank and write one atomic checkpoint in
        the same format for any number of ranks (so either kind of run resumes the other)."""
        own = {"stages": {k: self.rule.stages[k].training_state() for k in self.held},
               "torch_rng": torch.get_rng_state(), "activation_bytes": self.activation_bytes,
               "cuda_step_bytes": self.cuda_step_bytes, "flops": self.flops}
        parts = self.comm.gather_to_main(own)
        if parts is None:
            return
        n = len(self.rule.stages)
        self.activation_bytes = [max(p["activation_bytes"][k] for p in parts) for k in range(n)]
        self.cuda_step_bytes = [max((p["cuda_step_bytes"][k] for p in parts if p["cuda_step_bytes"][k] is not None),
                                    default=None) for k in range(n)]
        self.flops = [max((p["flops"][k] for p in parts if p["flops"][k] is not None), default=None) for k in range(n)]
        if self.run:
            stages = {k: s for part in parts for k, s in part["stages"].items()}
            state = {
                "epochs_done": len(self.rows),
                "stages": [stages[k] for k in range(n)],
                "shuffle_rng": self.shuffle.get_state(),
                "augment_rng": self.augment_rng.get_state(),
                "loader_rngs": [g.get_state() for g in self.loaders.generators()] if self.loaders else [],
                "torch_rng": parts[0]["torch_rng"],
                "rank_torch_rng": [p["torch_rng"] for p in parts],
                "train_time": self.train_time,
                "activation_bytes": self.activation_bytes,
                "cuda_step_bytes": self.cuda_step_bytes,
                "flops": self.flops,
                "config": self.cfg.to_dict(),
                **provenance(),
            }
            self.run.write_metrics_rows(self.rows)
            save_checkpoint(self.run.file("checkpoint.pt"), state)

    def resume(self) -> None:
        why = self.loaders.exact_order() if self.loaders is not None else None
        if why:
            raise BpfreeError(f"--resume would not continue exactly: {why}; use torch DataLoaders over map-style "
                              "datasets (shuffled by a generator or not at all), or start a new run")
        def load():
            state = load_checkpoint(self.run.file("checkpoint.pt"))
            return state, self.run.read_metrics_rows()[: state["epochs_done"]]
        state, rows = self.comm.from_main(load)
        if len(rows) != state["epochs_done"]:
            raise BpfreeError(f"{self.run.path if self.run else 'the run'}/metrics.jsonl has fewer epochs than "
                              "its checkpoint; cannot resume")
        where = self.run.file("checkpoint.pt") if self.run else "the checkpoint"
        if len(state["stages"]) != len(self.rule.stages):
            raise BpfreeError(f"{where} holds {len(state['stages'])} stages, but method {self.rule.name} on this "
                              f"model has {len(self.rule.stages)}: it belongs to another run")
        try:
            for stage, s in zip(self.rule.stages, state["stages"]):
                stage.load_training_state(s)
        except (RuntimeError, KeyError, ValueError) as e:
            raise BpfreeError(f"{where} does not fit method {self.rule.name} on this model, it belongs to another "
                              f"run ({first_line(e)[:120]})") from None
        self.shuffle.set_state(state["shuffle_rng"])
        if "augment_rng" in state:
            self.augment_rng.set_state(state["augment_rng"])
        for g, saved in zip(self.loaders.generators() if self.loaders else [], state.get("loader_rngs", [])):
            g.set_state(saved)
        rank_rng = state.get("rank_torch_rng") or [state["torch_rng"]]
        torch.set_rng_state(rank_rng[self.comm.rank] if len(rank_rng) == self.comm.world else state["torch_rng"])
        self.train_time = state["train_time"]
        self.activation_bytes = list(state["activation_bytes"])
        self.cuda_step_bytes = list(state.get("cuda_step_bytes") or self.cuda_step_bytes)
        self.flops = list(state.get("flops") or self.flops)
        self.rows = rows

    # --- one epoch -------------------------------------------------------------------------
    def _prefix_cache(self, first: int, x: torch.Tensor):
        """Outputs of the frozen stages before `first` on the whole training set, or None (also
        when batches are augmented: then the prefix sees new inputs every epoch; and for inputs
        streamed from files, which are not held in memory)."""
        if first == 0 or self.comm.world > 1 or self.augment or self.loaders is not None or not isinstance(x, torch.Tensor):
            return None
        normalize = self.data.normalize
        probe = self._through(normalize(x[:2]), range(first))
        per_row = sum(t[0].numel() * t.element_size() for t in probe)
        if per_row * len(x) > CACHE_LIMIT_BYTES:
            return None
        parts = [self._through(normalize(x[i:i + EVAL_BATCH]), range(first)) for i in range(0, len(x), EVAL_BATCH)]
        return tuple(torch.cat(ts) for ts in zip(*parts))

    @torch.no_grad()
    def _through(self, x, stage_indices):
        message = (x,)
        with autocast(self.cfg.precision, self.device):
            for k in stage_indices:
                message = self.rule.stages[k](*message)
        return message

    def _call(self, k: int, what: str, fn, *args):
        """One piece of stage k's work, timed; the first step of an epoch also measures its
        activation memory (tensors saved for backward, or those the stage holds until its update),
        and a stage's first step of the run its FLOPs (every piece of the batch: step, feedback, update)."""
        begin = time.perf_counter()
        stage = self.rule.stages[k]
        if self._measuring and what == "update":
            self.activation_bytes[k] = max(self.activation_bytes[k], tensor_bytes(stage.held_tensors()))
        counter = FlopCounterMode(display=False) if k in self._counting else contextlib.nullcontext()
        with counter:
            if self._measuring and what == "step":
                with self.cuda.measure() as peak:
                    out, nbytes = saved_activation_bytes(stage, fn, *args)
                self.activation_bytes[k] = max(self.activation_bytes[k], nbytes)
                if peak["bytes"] is not None:
                    self.cuda_step_bytes[k] = max(self.cuda_step_bytes[k] or 0, peak["bytes"])
            else:
                out = fn(*args)
        if k in self._counting:
            self.flops[k] = (self.flops[k] or 0) + counter.get_total_flops()
        self.comm.clock["compute_s"] += time.perf_counter() - begin
        return out

    def train_epoch(self, phase: Phase, epoch: int, first_step: int = 0) -> dict:
        """Train `phase` one epoch (steps numbered from `first_step`); its time, steps and evaluations."""
        stages, trained = self.rule.stages, phase.stages
        first, last = trained[0], trained[-1]
        for k in self.held:
            if k in trained:
                stages[k].train()
                stages[k].requires_grad_(True)
            elif k < first:
                _freeze(stages[k])
            stages[k].stats.reset()
        x, y = self.data.x_train, self.data.y_train
        if phase.rows is not None:
            x, y = x[phase.rows], y[phase.rows]
        cache = self._prefix_cache(first, x)
        run = [k for k in self.held if k <= last and (cache is None or k >= first)]
        steps, bs = self.steps(phase), min(self.cfg.batch_size, len(y))
        perm = torch.randperm(len(y), generator=self.shuffle).to(self.device)

        index_batches = [perm[i * bs:(i + 1) * bs] for i in range(steps)]
        seen = [0]               # examples trained on, counted where the batches are read (loaders)

        def source():            # every stage sees the same augmented batch
            if self.loaders is not None:
                for message, labels in self._loader_batches(self.loaders.train, steps):
                    seen[0] += len(labels)
                    yield message, labels
                return
            if cache is not None:
                for idx in index_batches:
                    yield tuple(t[idx] for t in cache), y[idx]
                return
            stored = batches_of(x, index_batches, workers=self.cfg.workers, device=self.device)
            for inputs, idx in zip(stored, index_batches):
                batch = self.augment(inputs, self.augment_rng) if self.augment else inputs
                yield (self.data.normalize(batch),), y[idx]

        batches = self.comm.batches(source, steps, epoch)
        bar = tqdm(batches, total=steps, desc=f"epoch {epoch}", leave=False, disable=self.quiet, file=sys.stderr)
        watched = [k for k in run if k in trained]
        every, evals, paused = self.cfg.eval_every, [], 0.0
        start = shown = time.perf_counter()
        for i, (message, labels) in enumerate(bar):
            self._measuring = i == 0     # activation memory on the first step of every epoch
            self._counting = {k for k in watched if self.flops[k] is None} if i == 0 else set()
            self.rule.train_step(message, labels, stages=trained, held=run, link=self.comm, call=self._call,
                                 set_modes=False)     # modes are set once per epoch, above
            self._counting = set()
            if i % 20 == 0 or i == steps - 1:
                self._check_finite(watched, epoch, i)
                if not self.quiet and watched:
                    bar.set_postfix(stages[watched[-1]].stats.summary())
            if self.progress_s is not None and time.perf_counter() - shown >= self.progress_s:
                shown = time.perf_counter()
                self._progress(epoch, i + 1, steps, shown - start - paused, watched)
            if every and (first_step + i + 1) % every == 0 and i < steps - 1:   # the epoch's end evaluates anyway
                begin = time.perf_counter()
                evals.append(self._evaluate_between_steps(first_step + i + 1))
                paused += time.perf_counter() - begin
        bar.close()
        self.comm.flush()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)       # the epoch's queued kernels belong to its time
        # the epoch ends when the last rank is done; mid-epoch evaluations are not training time
        elapsed = self.comm.max(time.perf_counter() - start - paused)
        if self.rule.needs_all_stages:
            self.comm.share_weights(stages)
        samples = steps * bs if self.loaders is None else int(self.comm.max(float(seen[0])))
        return {"epoch_time_s": elapsed, "train_samples": samples, "steps": steps, "evals": evals}

    def _progress(self, epoch: int, done: int, steps: int, seconds: float, watched: list[int]) -> None:
        losses = ", ".join(f"{self.rule.stages[k].name} {self.rule.stages[k].stats.summary()['loss']:.4f}"
                           for k in watched)
        print(f"epoch {epoch}: step {done}/{steps} ({100 * done / steps:.0f}%), {done / seconds:.2f} steps/s, "
              f"mean local loss {losses}", file=sys.stderr, flush=True)

    def _evaluate_between_steps(self, step: int) -> dict:
        """Test (and validation) accuracy after training step `step`, inside an epoch, with `evaluate`
        as at an epoch's end. Training goes on exactly as without it: eval mode leaves BatchNorm's
        statistics alone, every module's train/eval mode is restored, the torch RNG is forked (no
        random number is taken from training), and the epoch's local-loss sums are not touched.
        Under --parallel every rank evaluates after the same step: the evaluation batches follow
        that step's message down the same links, and the counts are summed by a collective."""
        stages = self.rule.stages
        self.comm.flush()
        if self.rule.needs_all_stages:      # readouts that run other ranks' stages need their weights now
            self.comm.share_weights(stages)
        with evaluating(stages), torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            test_acc, _, test_loss = self.evaluate("test")
            val_acc, _, val_loss = self.evaluate("val")
        return {"step": step, "test_acc": test_acc, "test_loss": test_loss,
                **({"val_acc": val_acc, "val_loss": val_loss} if self.has_split("val") else {})}

    def _check_finite(self, watched: list[int], epoch: int, step: int) -> None:
        for k in watched:
            stats = self.rule.stages[k].stats
            if math.isfinite(float(stats.loss_sum)):
                continue
            stage = f"stage {k} ({self.rule.stages[k].name})"
            kept = f"; the last good checkpoint is kept in {self.run.path}" if self.run and self.rows else ""
            if step == 0 and not any(k in row.get("stages_trained", [k]) for row in self.rows):
                # its very first loss, computed before any update: the learning rate played no part
                raise DivergedError(f"loss of {stage} is non-finite at its first step, before any update "
                                    f"(epoch {epoch}): not the learning rate; check the data for NaN or inf and "
                                    f"this rule's loss on this model{kept}")
            raise DivergedError(f"loss of {stage} became non-finite at epoch {epoch}, step {step}: lower --lr{kept}")

    # --- evaluation ------------------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        """Whether the data has a `split` ("test" or "val") to evaluate on."""
        if self.loaders is not None:
            return getattr(self.loaders, split) is not None
        return len(getattr(self.data, f"y_{split}")) > 0

    def _loader_batches(self, loader, count: Optional[int] = None):
        """A user's loader's (x, y) batches as messages on the device (labels checked on the first)."""
        for i, batch in enumerate(loader):
            if count is not None and i == count:
                return
            x, y = batch_of(batch, "a loader")
            if i == 0 and not 0 <= int(y.min()) <= int(y.max()) < self.data.num_classes:
                raise BpfreeError(f"a loader yields label {int(y.max()) if y.min() >= 0 else int(y.min())}; labels "
                                  f"must be 0..{self.data.num_classes - 1} (num_classes {self.data.num_classes})")
            yield (self.rule.inputs(x),), y.to(self.device, non_blocking=True)

    @torch.no_grad()
    def evaluate(self, split: str) -> tuple[float, list[Optional[float]], float]:
        """Accuracy of the rule's prediction and of each stage's own readout on the "test" or "val"
        split, and the prediction's mean cross-entropy (per example, or per token of a sequence) (each
        rank counts the hits of the stages it holds; the counts are summed over ranks)."""
        if not self.has_split(split):
            return float("nan"), [], float("nan")
        stages = self.rule.stages
        stages.eval()
        clock = dict(self.comm.clock)          # the reported wait / communication times are training's
        counts = torch.zeros(3, len(stages), dtype=torch.int64, device=self.device)   # hits, has a readout, seen
        losses = torch.zeros(len(stages), dtype=torch.float64, device=self.device)     # summed cross-entropy
        if self.loaders is not None:
            loader = getattr(self.loaders, split)
            count = len(loader) if hasattr(loader, "__len__") else None

            def source():
                return self._loader_batches(loader)
        else:
            x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
            starts = [slice(i, i + EVAL_BATCH) for i in range(0, len(y), EVAL_BATCH)]    # Rule.predict's batches
            count = len(starts)

            def source():
                stored = batches_of(x, starts, workers=self.cfg.workers, device=self.device)
                return (((self.rule.inputs(self.data.normalize(inputs)),), y[idx]) for inputs, idx in zip(stored, starts))

        for message, labels in self.comm.batches(source, count):
            message, readouts = self.rule.infer(message, self.held)     # as Rule.predict and Rule.evaluate
            for k, scores in readouts.items():
                counts[2, k] += labels.numel()
                if scores is not None:
                    counts[0, k] += hits(scores, labels)
                    counts[1, k] = 1
                    losses[k] += class_loss(scores.float(), labels, reduction="sum")
            self.comm.send(message, labels)
        self.comm.flush()
        self.comm.clock.update(clock)
        correct, has_readout, seen = self.comm.sum_(counts).tolist()
        loss = self.comm.sum_(losses).tolist()
        accs = [h / n if r else None for h, r, n in zip(correct, has_readout, seen)]
        k = self.rule.prediction_stage
        return accs[k], accs, loss[k] / seen[k] if has_readout[k] else float("nan")

    # --- the loop --------------------------------------------------------------------------
    def fit(self, stop_after: Optional[int] = None) -> dict:
        """Train every phase to completion (or until `stop_after` epochs in all have been done)."""
        epoch = step = 0         # step: training steps done before this epoch, over all phases
        for phase in self.phases:
            for _ in range(phase.epochs):
                epoch, first_step, step = epoch + 1, step, step + self.steps(phase)
                if epoch <= len(self.rows):
                    continue        # done before a resume
                if stop_after is not None and epoch > stop_after:
                    return {}
                row = self._epoch(phase, epoch, first_step)
                if self.on_epoch:
                    self.on_epoch(row)
            for k in phase.stages:
                if self.schedule == "sequential":
                    _freeze(self.rule.stages[k])
        return self._finish()

    def _epoch(self, phase: Phase, epoch: int, first_step: int) -> dict:
        timing = self.train_epoch(phase, epoch, first_step)
        self.train_time += timing["epoch_time_s"]
        test_acc, stage_test, test_loss = self.evaluate("test")
        val_acc, _, val_loss = self.evaluate("val")
        row = {
            "epoch": epoch,
            "step": first_step + timing["steps"],       # training steps done, over all epochs
            "stages_trained": phase.stages,
            "test_acc": test_acc,
            "test_loss": test_loss,
            **({"val_acc": val_acc, "val_loss": val_loss} if self.has_split("val") else {}),
            "epoch_time_s": timing["epoch_time_s"],
            "samples_per_s": timing["train_samples"] / timing["epoch_time_s"],
            "wall_time_s": self.train_time,
            "stages": [{"name": s.name, **summary, **({"test_acc": a} if a is not None else {})}
                       for s, summary, a in zip(self.rule.stages, self._stage_summaries(phase), stage_test)],
            **({"step_evals": timing["evals"]} if self.cfg.eval_every else {}),
        }
        self.rows.append(row)
        self._save()
        return row

    def _stage_steps(self) -> list[int]:
        """How many training steps each stage took over the whole run."""
        return [sum(p.epochs * self.steps(p) for p in self.phases if k in p.stages) for k in range(len(self.rule.stages))]

    def _stage_summaries(self, phase: Phase) -> list[dict]:
        """Each stage's local loss (and readout accuracy) this epoch; {} for stages not trained."""
        mine = {k: self.rule.stages[k].stats.summary() for k in self.held if k in phase.stages}
        merged = {k: v for part in self.comm.gather(mine) for k, v in part.items()}
        return [merged.get(k, {}) for k in range(len(self.rule.stages))]

    def _finish(self) -> dict:
        self.comm.share_weights(self.rule.stages)      # the main rank saves every stage's final weights
        execution = self.comm.describe(max((self.activation_bytes[k] for k in self.held), default=0))
        if not self.comm.is_main:
            return {}
        samples = sum(r["samples_per_s"] * r["epoch_time_s"] for r in self.rows)
        last = self.rows[-1]
        origin = self.rule.net.origin          # the records name what was trained: the objects, not defaults
        summary = {
            "method": self.rule.name,
            "model": f"module:{origin['module']}" if origin else self.cfg.model,
            "data": self.data.name,
            "schedule": self.schedule,
            "blocks": self.rule.net.num_blocks,
            "epochs": len(self.rows),
            "seed": self.cfg.seed,
            "num_classes": self.data.num_classes,
            "in_shape": list(self.data.in_shape),
            "normalization": _statistics(self.data),
            "output_labels": self.cfg.output_labels,
            "test_accuracy": last["test_acc"],
            "test_loss": last["test_loss"],          # mean cross-entropy, nats per example (or per token)
            **_bits_per_byte(self.loaders, last["test_loss"]),
            **({"val_accuracy": last["val_acc"]} if "val_acc" in last else {}),
            "best_val_accuracy": max((r["val_acc"] for r in self.rows if "val_acc" in r), default=None),
            "train_time_s": self.train_time,
            "samples_per_s": samples / self.train_time if self.train_time else 0.0,
            "peak_activation_bytes": max(self.activation_bytes),
            "activation_bytes_per_stage": self.activation_bytes,
            "cuda_peak_bytes": self.cuda.run_bytes(),
            "cuda_step_peak_bytes_per_stage": self.cuda_step_bytes,
            "memory_note": "peak_activation_bytes: tensors saved for backward in one step of the largest "
                           "stage (autograd saved-tensor hooks; parameters excluded), or those a stage holds "
                           "from its step to its update (rules without autograd)",
            "train_flops_per_step_per_stage": self.flops,
            "train_flops_per_step": sum(f or 0 for f in self.flops),
            "train_flops": sum((f or 0) * steps for f, steps in zip(self.flops, self._stage_steps())),
            "flops_note": "torch.utils.flop_counter on one training step of each stage (forward, local loss, "
                          "backward, aux nets; matmuls, convolutions and attention); train_flops: over every "
                          "step each stage trained (frozen stages' forward passes and evaluation excluded)",
            "parameters": sum(p.numel() for p in self.rule.stages.parameters()),
            "stages": [{"name": s.name, "parameters": sum(p.numel() for p in s.parameters()),
                        **{k: v for k, v in st.items() if k != "name"}}
                       for s, st in zip(self.rule.stages, last["stages"])],
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(self.device),
            "precision": self.cfg.precision,
            **provenance(),
            "config": json.loads(json.dumps(self.cfg.to_dict())),    # as config.json holds it
            **execution,
        }
        if self.run:
            save_weights(self.run.file("model.safetensors"), self.rule.stages)
            self.run.write_summary(summary)
        return summary


def _bits_per_byte(loaders, loss: float) -> dict:
    """Byte-level text: the test loss in bits per byte (what language-model papers report)."""
    per_token = getattr(getattr(loaders, "test", None), "bytes_per_token", None)
    return {"test_bits_per_byte": loss / math.log(2) / per_token} if per_token else {}


def _statistics(data: Data) -> Optional[dict]:
    """The training split's normalisation statistics, as recorded: a loaded run's data must match them."""
    if data.mean is None or data.std is None:
        return None
    return {"mean": data.mean.flatten().tolist(), "std": data.std.flatten().tolist()}


def _place(data: Data, device: torch.device, memory_format: torch.memory_format) -> Data:
    """The dataset's tensors on the training device, images in the rule's memory layout."""
    def place(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        return t.contiguous(memory_format=memory_format) if t.dim() == 4 else t
    return dataclasses.replace(data, **{f.name: place(getattr(data, f.name)) for f in dataclasses.fields(data)
                                        if isinstance(getattr(data, f.name), torch.Tensor)})
