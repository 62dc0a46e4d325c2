"""A run, set up once: check the settings, load the data, resolve the split, build the rule, open
the run directory, resume, fit, for one process or for every rank of a parallel run.

    train(cfg, "runs/x")                                        one process
    train(cfg, "runs/x", RunOptions(parallel=2))                two local processes, pipelined
    train(cfg, data=my_data, quiet=True)                        RunOptions fields as keywords

With `out`, the run directory gets config.json, metrics and checkpoints; `resume` continues it
from its last checkpoint and ends exactly where an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import RunConfig
from .data import Data, load_data
from .engine import launch
from .engine.comm import LocalComm, PipelineComm, check_pipeline
from .engine.loop import Trainer, check_inputs, plan_phases
from .errors import BpfreeError
from .io import load_weights
from .models import balanced_split, create_model
from .rules import Rule, get_rule, make_options
from .runs import RunDir, check_logs, epoch_loggers, read_run


@dataclass
class RunOptions:
    """How to carry out a run (its config says what the run is)."""

    resume: bool = False              # continue the run in `out` from its last checkpoint
    overwrite: bool = False           # replace an earlier run in `out`
    quiet: bool = False               # no progress bar
    data: Optional[Data] = None       # train on these tensors instead of loading cfg.data
    stop_after: Optional[int] = None  # stop after this many epochs in all (tests of resume)
    on_epoch: Optional[Callable[[dict], None]] = None   # called with each epoch's metrics row
    parallel: Optional[int] = None    # W: stages on W local processes; 0: this is one rank of a torchrun job
    in_flight: int = 2                # --parallel: batches queued between neighbouring processes
    timeout_s: float = 600.0          # --parallel: a rank silent this long (hung, not dead) is declared lost
    rule: Optional[Rule] = None       # train this rule (e.g. on your own module cut by BlockNet.from_module)
    progress_s: float = 60.0          # stderr not a terminal (nohup, SLURM): a progress line every this many seconds


def train(cfg: Optional[RunConfig] = None, out=None, options: Optional[RunOptions] = None, **fields) -> Optional[dict]:
    """Run one training job end to end; returns the final summary (metrics.json's content), or
    None on a rank other than 0. Keywords are RunOptions fields, applied over `options`. With
    `rule=` (your own network) `cfg` may be left out: its method is the rule's."""
    if options is not None and not isinstance(options, RunOptions):
        raise BpfreeError(f"train()'s third argument is a RunOptions (or give its fields as keywords), got "
                          f"{type(options).__name__}")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(RunOptions)})
    if unknown:
        raise BpfreeError(f"train() has no keyword {unknown[0]!r}; settings of the run go in its RunConfig, and "
                          f"the keywords are RunOptions fields: {', '.join(f.name for f in dataclasses.fields(RunOptions))}")
    options = dataclasses.replace(options or RunOptions(), **fields)
    _check(options)
    cfg = _given(cfg, options)
    if options.data is not None:
        cfg = _recorded(cfg, options.data)
    if options.parallel is None:
        return _fit(cfg, out, options, LocalComm())
    if options.data is not None and options.data.loaders is not None:
        raise BpfreeError("--parallel reads bpfree's own datasets (rank 0 feeds the pipeline); Data.from_loaders "
                          "trains in one process")
    if options.in_flight < 1:
        raise BpfreeError(f"--in-flight must be a positive integer, got {options.in_flight}")
    if not options.timeout_s > 0:
        raise BpfreeError(f"--timeout must be a positive number of seconds, got {options.timeout_s}")
    if launch.under_torchrun():
        launch.check_world(options.parallel)
        return launch.join(_rank, (cfg, out, options), launch.backend(cfg.device), options.timeout_s)
    if options.parallel < 1:
        raise BpfreeError("--parallel without a number works only under torchrun; outside it give the "
                          "number of processes, e.g. --parallel 2")
    # Check everything here, where an error is one line and nothing has been started.
    _, cfg = prepare(cfg, out, options)
    backend = launch.backend(cfg.device)
    data = options.data if options.data is not None else load_for(cfg)
    cfg = resolve_split(cfg, data)        # measured once, here: every rank uses the same split
    rule = options.rule if options.rule is not None else build(cfg, data)
    check_inputs(rule, data, cfg)
    check_pipeline(rule, plan_phases(rule, cfg)[0], options.parallel)
    return launch.spawn(options.parallel, _rank, (cfg, out, options), backend, options.timeout_s, out)


def _check(options: RunOptions) -> None:
    """Each RunOptions field's type, in one line (a string where a number belongs, ...)."""
    def whole(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low
    checks = [("resume", isinstance(options.resume, bool), "True or False"),
              ("overwrite", isinstance(options.overwrite, bool), "True or False"),
              ("quiet", isinstance(options.quiet, bool), "True or False"),
              ("parallel", options.parallel is None or whole(options.parallel, 0), "a number of processes (int)"),
              ("in_flight", whole(options.in_flight, 1), "a positive integer"),
              ("stop_after", options.stop_after is None or whole(options.stop_after, 1), "a positive integer"),
              ("timeout_s", isinstance(options.timeout_s, (int, float)) and not isinstance(options.timeout_s, bool),
               "a number of seconds"),
              ("progress_s", isinstance(options.progress_s, (int, float)) and not isinstance(options.progress_s, bool),
               "a number of seconds"),
              ("on_epoch", options.on_epoch is None or callable(options.on_epoch), "a function of a metrics row")]
    for name, ok, expected in checks:
        if not ok:
            raise BpfreeError(f"train({name}=...) must be {expected}, got {getattr(options, name)!r}")


def _given(cfg, options: RunOptions) -> RunConfig:
    """The run's config, checked against the objects it is given (a record must not lie)."""
    if cfg is not None and not isinstance(cfg, RunConfig):
        raise BpfreeError(f"train() takes a RunConfig first (then the run directory), got {type(cfg).__name__}")
    rule = options.rule
    if rule is None:
        return cfg if cfg is not None else RunConfig()
    if not isinstance(rule, Rule):
        raise BpfreeError(f"rule= must be a bpfree Rule (bpfree.create_rule(name, net)), got {type(rule).__name__}")
    if cfg is None:
        cfg = RunConfig(method=rule.name)
    if cfg.method != rule.name:
        raise BpfreeError(f"the config says method {cfg.method!r} but the rule given is {rule.name!r}; leave the "
                          "config's method to the rule (RunConfig(method=rule.name)) or pass cfg=None")
    origin = rule.net.origin
    recorded = {"rule_options": dataclasses.asdict(rule.options), "blocks": rule.net.num_blocks}
    if origin is not None:        # a network cut from the user's own module: record what it is
        recorded.update(model=f"module:{origin['module']}", split="even",
                        model_options={k: v for k, v in origin.items() if k != "module"})
    return dataclasses.replace(cfg, **recorded)


def _recorded(cfg: RunConfig, data: Data) -> RunConfig:
    """The config as trained on `data`: its name (not the config's default), a loader's batch size."""
    if not isinstance(data, Data):
        raise BpfreeError(f"data= must be a bpfree Data (load_data(name), or Data.from_loaders(train_loader, "
                          f"test_loader) for your DataLoaders), got {type(data).__name__}")
    values = {"data": data.name, "data_sha256": data.fingerprint()}
    batch = getattr(data.loaders.train, "batch_size", None) if data.loaders is not None else None
    if isinstance(batch, int):
        values["batch_size"] = batch
    return dataclasses.replace(cfg, **values)


def _rank(cfg: RunConfig, out, options: RunOptions) -> Optional[dict]:
    """One rank of a parallel run, in an initialised process group."""
    return _fit(cfg, out, options, PipelineComm(options.in_flight))


def _fit(cfg: RunConfig, out, options: RunOptions, comm: LocalComm) -> Optional[dict]:
    run, data = None, None
    if comm.is_main:
        run, cfg = prepare(cfg, out, options)
        data = options.data if options.data is not None else load_for(cfg)
        cfg = resolve_split(cfg, data)
    cfg, data = comm.share_setup(cfg, data)
    rule = options.rule if options.rule is not None else build(cfg, data)
    trainer = Trainer(rule, data, comm.configure(cfg), quiet=options.quiet, on_epoch=options.on_epoch,
                      comm=comm, progress_s=options.progress_s)    # every setting is checked by now
    if run is not None:                   # create the run directory only now, and record a new run's config
        trainer.run = run.create()
        if not options.resume:
            run.write_config(cfg.to_dict())
    if options.resume:
        trainer.resume()
    if cfg.log and comm.is_main:
        trainer.on_epoch = _chain(trainer.on_epoch, *epoch_loggers(cfg.log, trainer.run, trainer.rows))
    summary = trainer.fit(stop_after=options.stop_after)
    comm.barrier()
    return summary if comm.is_main else None


def _chain(*callbacks):
    def call(row):
        for callback in callbacks:
            if callback is not None:
                callback(row)
    return call


def prepare(cfg: RunConfig, out, options: RunOptions) -> tuple[Optional[RunDir], RunConfig]:
    """Check the settings and the run directory (creating nothing); on resume, the run's own config."""
    if options.resume and out is None:
        raise BpfreeError("--resume needs --out DIR of the run to continue")
    run = RunDir(out, resume=options.resume, overwrite=options.overwrite) if out is not None else None
    if options.resume:
        cfg = _resumed(cfg, RunConfig.from_dict(run.read_config()), run.path)
    cfg.validate()
    if cfg.log:
        if out is None:
            raise BpfreeError("--log writes metrics.csv / tensorboard/ into the run directory: give --out DIR")
        check_logs(cfg.log)
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise BpfreeError("--device cuda requested but CUDA is not available here; use --device cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    get_rule(cfg.method)   # fail on an unknown name before loading data
    return run, cfg


# Settings that say where or how fast a run executes, not what it computes: a resumed run may change them.
RESUME_MAY_CHANGE = ("threads", "device", "data_dir", "workers", "log")


def _resumed(given: RunConfig, saved: RunConfig, path) -> RunConfig:
    """The saved run's config, refusing a given setting that differs from it: --resume continues a
    run exactly as it was configured (more epochs would change every stage's LR schedule, so a run
    is not extended either)."""
    def effective(cfg):         # rule options with their defaults filled in: "not given" = the default
        values = cfg.to_dict()
        if values["method"] == saved.method:
            values["rule_options"] = dataclasses.asdict(make_options(get_rule(cfg.method), cfg.rule_options))
        return json.loads(json.dumps(values))
    mine, theirs = effective(given), effective(saved)
    for name, value in mine.items():
        if name in RESUME_MAY_CHANGE or value == theirs[name]:
            continue
        if name == "split" and value == "balanced" and isinstance(theirs[name], list):
            continue                                       # resolved to these indices when the run started
        other = theirs[name]
        flag = "--" + name.replace("_", "-")
        if name == "data_sha256":
            raise BpfreeError(f"--resume continues {path} on the data it was trained on, but the data given has other "
                              f"content (data_sha256 {str(value)[:12]}... here, {str(other)[:12]}... in its "
                              "config.json); resume with the same tensors, or start a new run in another --out")
        if isinstance(value, dict) and isinstance(other, dict):     # name the option inside
            key = next(k for k in sorted(set(value) | set(other)) if value.get(k) != other.get(k))
            flag = f"--model-opt {key}" if name == "model_options" else "--" + key.replace("_", "-")
            value, other = value.get(key), other.get(key)
        raise BpfreeError(f"--resume continues {path} as configured, but {flag} is {value!r} here and "
                          f"{other!r} in its config.json; to change it (epochs included), start a new "
                          "run in another --out")
    return dataclasses.replace(saved, **{k: getattr(given, k) for k in RESUME_MAY_CHANGE})


def load_for(cfg: RunConfig) -> Data:
    return load_data(cfg.data, data_dir=cfg.data_dir, train_subset=cfg.train_subset,
                     val_split=cfg.val_split, seed=cfg.seed, image_size=cfg.image_size,
                     stream=cfg.stream, context=cfg.context, batch_size=cfg.batch_size, text_split=cfg.text_split)


def resolve_split(cfg: RunConfig, data: Data) -> RunConfig:
    """`split: balanced` becomes the measured block boundaries, recorded so config.json reproduces the run."""
    if cfg.split != "balanced":
        return cfg
    starts = balanced_split(cfg.model, data.num_classes, data.in_shape, cfg.blocks,
                            batch=min(cfg.batch_size, 256), **cfg.model_options)
    return dataclasses.replace(cfg, split=starts)


def build(cfg: RunConfig, data: Data) -> Rule:
    """The rule for this config, on a freshly initialised model (same seed, same weights)."""
    return build_for_shape(cfg, data.num_classes, data.in_shape)


def build_for_shape(cfg: RunConfig, num_classes: int, in_shape: tuple[int, ...]) -> Rule:
    rule_cls = get_rule(cfg.method)
    options = make_options(rule_cls, cfg.rule_options)
    torch.manual_seed(cfg.seed)
    net = create_model(cfg.model, num_classes, tuple(in_shape), blocks=cfg.blocks, split=cfg.split,
                       **cfg.model_options)
    return rule_cls(net, options)


def load_trained(run_dir, rule: Optional[Rule] = None, *, threads: bool = True) -> Rule:
    """The trained rule of a finished run directory, set up to predict exactly as the run evaluated:
    weights from its model.safetensors, the run's precision, the memory layout it used on the CPU,
    eval mode, and (`threads`) the run's thread count for this process, since a CPU kernel's rounding
    may depend on it. Its inputs are the run's: `load_run_data(run_dir)`. A run of your own module:
    pass `rule`, built as for the run (the weights land in your module's parameters)."""
    config, _, summary = read_run(run_dir)
    if "in_shape" not in summary:
        raise BpfreeError(f"{run_dir} was written by an older bpfree without input shapes; re-run it")
    cfg = RunConfig.from_dict(config)
    if rule is None and cfg.model.startswith("module:"):
        raise BpfreeError(f"{run_dir} trained your own module {cfg.model[len('module:'):]}; build and cut it as "
                          f"for the run, then load_trained(run_dir, rule=create_rule({cfg.method!r}, net))")
    if rule is not None and (not isinstance(rule, Rule) or rule.name != cfg.method):
        raise BpfreeError(f"{run_dir} trained method {cfg.method!r}; the rule given is "
                          f"{getattr(rule, 'name', type(rule).__name__)!r}")
    rule = rule or build_for_shape(cfg, summary["num_classes"], summary["in_shape"])
    load_weights(Path(run_dir) / "model.safetensors", rule.stages)
    rule.precision = cfg.precision
    rule.place("cpu")
    rule.stages.eval()
    if threads and summary.get("threads"):
        torch.set_num_threads(summary["threads"])
    return rule


def load_run_data(run_dir) -> Data:
    """A finished run's data, loaded as the run loaded it (its dataset, subset, validation split and
    seed, hence its normalisation); refused when the statistics differ from those the run recorded
    (the files changed since)."""
    config, _, summary = read_run(run_dir)
    data = load_for(RunConfig.from_dict(config))
    recorded = summary.get("normalization")
    if recorded is not None and data.mean is not None:
        now = {"mean": data.mean.flatten().tolist(), "std": data.std.flatten().tolist()}
        if now != recorded:
            raise BpfreeError(f"{run_dir}: {config['data']} now has other normalisation statistics than the run "
                              f"recorded (mean {now['mean'][:3]} vs {recorded['mean'][:3]}): its files changed")
    return data
