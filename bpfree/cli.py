"""The `bpfree` command: parses arguments, builds a RunConfig, calls the library. No logic of its own.

A method's hyperparameters (its `Options` dataclass) become extra flags, e.g.
`bpfree train --method bwbpf --aux-head conv`; `bpfree list` shows them.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import shlex
import sys
import types
import typing
from pathlib import Path

from . import __version__
from .config import RunConfig
from .data import list_datasets, load_data
from .errors import BpfreeError
from .models import list_models
from .optim import LR_SCHEDULES, OPTIMIZERS
from .report import epoch_line, human_bytes, write_comparison
from .rules import SCHEDULES, get_rule, list_rules, make_options
from .train import load_trained, train
from .transfer import PROXIES, rank_sources


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (exit 2), not usage + message."""

    def error(self, message):
        raise BpfreeError(f"{message} (see: {self.prog} --help)")


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _split(text: str):
    return text if text in ("even", "balanced") else _ints(text)


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip().replace("-", "_"), value


def _add_run_options(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
    p.add_argument("--model", help=f"network (default {d.model}); see `bpfree list`")
    p.add_argument("--data", help=f"dataset name or npz:PATH (default {d.data})")
    p.add_argument("--blocks", type=int, help=f"number of blocks K the model is split into (default {d.blocks})")
    p.add_argument("--epochs", type=int, help=f"epochs (per stage under the sequential schedule; default {d.epochs})")
    p.add_argument("--stage-epochs", type=_ints, help="sequential schedule: epochs of each stage, e.g. 5,5,2")
    p.add_argument("--schedule", choices=SCHEDULES, help="override the method's default schedule")
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {d.optimizer}")
    p.add_argument("--lr", type=float, help=f"learning rate (default {d.lr})")
    p.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    p.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, help=f"per-step schedule (default {d.lr_schedule})")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--data-dir", help="where dataset files are (else $BPFREE_DATA, system paths, ~/.cache/bpfree)")
    p.add_argument("--train-subset", type=int, help="train on a seeded random subset of N examples")
    p.add_argument("--val-split", type=float, help="fraction of train held out for model selection")
    p.add_argument("--init-modules", metavar="RUN_DIR:0-J",
                   help="reuse trained stages 0..J of a finished run, frozen; train only the rest")
    p.add_argument("--output-labels", type=int, metavar="N",
                   help="stages that read class labels (e.g. an output layer) train on only N labelled "
                        "examples per class; stages learning from pairwise labels see all")
    p.add_argument("--split", type=_split, metavar="even|balanced|I,J,...",
                   help="where blocks start: even unit counts (default), balanced by measured time (best for "
                        "--parallel; the chosen indices are recorded), or the unit indices of blocks 2..K")
    p.add_argument("--model-opt", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="model builder option, e.g. widths=512,512 (repeatable)")
    p.add_argument("--config", help="start from a run's config.json (flags given here override it)")
    p.add_argument("--overwrite", action="store_true", default=False, help="replace an existing run directory")
    p.add_argument("--quiet", action="store_true", default=False, help="no progress bar or per-epoch lines")


def _parser() -> _Parser:
    parser = _Parser(prog="bpfree", description="Train deep networks without end-to-end backpropagation.")
    parser.add_argument("--version", action="version", version=f"bpfree {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    epilog = "Each method's own options are extra flags (e.g. --aux-head conv); `bpfree list` shows them."
    t = sub.add_parser("train", help="train one network with one learning rule", epilog=epilog,
                       argument_default=argparse.SUPPRESS)
    t.add_argument("--method", help="learning rule (default backprop); see `bpfree list`")
    t.add_argument("--out", help="run directory (default runs/METHOD-MODEL-DATA)")
    t.add_argument("--resume", action="store_true", default=False, help="continue the run in --out")
    t.add_argument("--parallel", type=int, nargs="?", const=0, metavar="W",
                   help="train the stages on W processes, pipelined (torch.distributed); without W, under "
                        "torchrun, this process is one of torchrun's ranks")
    t.add_argument("--in-flight", type=int, default=2, metavar="N",
                   help="--parallel: batches queued between neighbouring processes (default 2)")
    _add_run_options(t)
    c = sub.add_parser("compare", help="train several rules on identical model, data and seed",
                       epilog=epilog, argument_default=argparse.SUPPRESS)
    c.add_argument("--methods", required=True,
                   help="comma-separated rules, each NAME or NAME[key=value,...] (a rule option or a run "
                        "setting, e.g. dgl[schedule=sequential]); the first is the reference")
    c.add_argument("--out", help="comparison directory (default runs/compare-MODEL-DATA)")
    c.add_argument("--resume", action="store_true", default=False,
                   help="keep finished runs in --out, resume unfinished ones")
    _add_run_options(c)
    r = sub.add_parser("transfer-rank", help="score trained runs' frozen hidden modules on a target dataset "
                       "by the kernel proxy objective, without training")
    r.add_argument("--modules", nargs="+", required=True, metavar="RUN_DIR", help="finished run directories")
    r.add_argument("--data", required=True, help="target dataset name or npz:PATH")
    r.add_argument("--data-dir", help="where dataset files are")
    r.add_argument("--train-subset", type=int, help="score on a seeded subset of N target examples")
    r.add_argument("--proxy", default="alignment", choices=PROXIES, help="proxy objective (default alignment)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser("list", help="rules (with their options), models and datasets")
    return parser


# --- method options as flags ---------------------------------------------------------------
def _option_type(field: dataclasses.Field, hints: dict):
    kind = hints.get(field.name, str)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        return lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    if typing.get_origin(kind) in (tuple, list):
        inner = typing.get_args(kind)[0] if typing.get_args(kind) else str
        return lambda s: tuple(inner(v) for v in s.split(",") if v.strip())
    return kind if kind in (int, float, str) else str


def _method_options(methods: list[str], extra: list[str]) -> dict[str, dict]:
    """Parse leftover flags as the methods' own options; each method gets the ones it declares."""
    declared: dict[str, tuple] = {}
    for m in methods:
        options_cls = get_rule(m).Options
        hints = typing.get_type_hints(options_cls)
        for f in dataclasses.fields(options_cls):
            declared.setdefault(f.name, (f, hints))
    p = _Parser(prog="bpfree (method options)", add_help=False, argument_default=argparse.SUPPRESS)
    for name, (f, hints) in declared.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=_option_type(f, hints),
                       choices=f.metadata.get("choices"))
    try:
        ns, unknown = p.parse_known_args(extra)
    except BpfreeError as e:
        raise BpfreeError(str(e).replace(" (see: bpfree (method options) --help)", "")) from None
    if unknown:
        valid = ", ".join("--" + n.replace("_", "-") for n in sorted(declared)) or "none"
        raise BpfreeError(f"unrecognized argument {unknown[0]!r}; options of {', '.join(methods)}: {valid}")
    given = vars(ns)
    return {m: {k: v for k, v in given.items()
                if k in {f.name for f in dataclasses.fields(get_rule(m).Options)}} for m in methods}


def _config(args: argparse.Namespace, method: str, rule_options: dict) -> RunConfig:
    base = RunConfig.load(args.config).to_dict() if "config" in args else RunConfig().to_dict()
    given = {k: v for k, v in vars(args).items() if k in base}
    if "model_opt" in args:
        given["model_options"] = dict(args.model_opt)
    if "split" in args:
        given["model_options"] = {**given.get("model_options", base["model_options"]), "split": args.split}
    base.update(given)
    base["method"] = method
    base["rule_options"] = {**(base.get("rule_options") or {}), **rule_options}
    return RunConfig.from_dict(base)


def _slug(spec: str) -> str:
    return Path(spec[4:]).stem if spec.startswith("npz:") else spec


def _print_epoch(row: dict) -> None:
    print(epoch_line(row), flush=True)


def _train(args, extra) -> int:
    method = getattr(args, "method", None) or (RunConfig.load(args.config).method if "config" in args
                                               else RunConfig().method)
    options = _method_options([method], extra)[method]
    cfg = _config(args, method, options)
    out = getattr(args, "out", None) or f"runs/{cfg.method}-{cfg.model}-{_slug(cfg.data)}"
    quiet = args.quiet
    summary = train(cfg, out, resume=args.resume, overwrite=args.overwrite, quiet=quiet,
                    on_epoch=None if quiet else _print_epoch, parallel=getattr(args, "parallel", None),
                    in_flight=args.in_flight)
    if summary is None:    # a torchrun rank other than 0: rank 0 reports
        return 0
    print(f"{summary['method']} on {summary['model']}/{summary['data']}: test accuracy "
          f"{100 * summary['test_accuracy']:.2f}% after {summary['epochs']} epochs, "
          f"{summary['train_time_s']:.1f} s training, {summary['samples_per_s']:.0f} samples/s, "
          f"peak activation memory {human_bytes(summary['peak_activation_bytes'])} -> {out}")
    return 0


def _split_entries(text: str) -> list[str]:
    """Split "a,b[x=1,y=2],c" on the commas outside brackets."""
    entries, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            entries.append(current.strip())
            current = ""
        else:
            current += ch
    entries.append(current.strip())
    return [e for e in entries if e]


def _parse_entry(entry: str) -> tuple[str, dict]:
    """`bwbpf[variant=deep-supervision,lr=0.01]` -> ("bwbpf", {"variant": ..., "lr": ...})."""
    match = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?", entry)
    if not match:
        raise BpfreeError(f"bad --methods entry {entry!r}; write NAME or NAME[key=value,...]")
    name, inner = match.group(1), match.group(2)
    settings = dict(_key_value(kv) for kv in _split_entries(inner or ""))
    return name, settings


def _coerce(kind, value):
    """A value from NAME[key=value] to the declared type of its option or config field."""
    if value is None or not isinstance(value, (str, int, float, tuple)):
        return value
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind in (int, float, str):
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise BpfreeError(f"expected {kind.__name__}, got {value!r}") from None
    return value


def _compare(args, extra, argv: list[str]) -> int:
    entries = _split_entries(args.methods)
    if not entries:
        raise BpfreeError("--methods needs at least one method; see `bpfree list`")
    if len(set(entries)) != len(entries):
        raise BpfreeError(f"--methods lists an entry twice: {args.methods}")
    parsed = [_parse_entry(e) for e in entries]
    names = list(dict.fromkeys(name for name, _ in parsed))
    options = _method_options(names, extra)
    config_types = typing.get_type_hints(RunConfig)
    configs = []
    for name, settings in parsed:
        rule_options = dict(options[name])
        overrides = {}
        option_types = typing.get_type_hints(get_rule(name).Options)
        for key, value in settings.items():
            if key in config_types and key not in ("method", "rule_options", "model_options"):
                overrides[key] = _coerce(config_types[key], value)
            else:
                rule_options[key] = _coerce(option_types.get(key, str), value)
        cfg = _config(args, name, rule_options)
        cfg = RunConfig.from_dict({**cfg.to_dict(), **overrides})
        make_options(get_rule(name), cfg.rule_options)
        cfg.validate()
        configs.append(cfg)
    out = Path(getattr(args, "out", None) or f"runs/compare-{configs[0].model}-{_slug(configs[0].data)}")
    if out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise BpfreeError(f"comparison directory {out} already exists; pass --resume to finish it, "
                          "--overwrite to replace it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    data = None
    run_dirs = [out / re.sub(r"[^\w.-]+", "_", e.replace("=", "-")).strip("_") for e in entries]
    for entry, cfg, run_dir in zip(entries, configs, run_dirs):
        if args.resume and (run_dir / "metrics.json").exists():
            continue
        if data is None:   # every method sees the very same tensors
            data = load_data(cfg.data, data_dir=cfg.data_dir, train_subset=cfg.train_subset,
                             val_split=cfg.val_split, seed=cfg.seed)
        if not args.quiet:
            print(f"== {entry}", flush=True)
        resume = args.resume and (run_dir / "checkpoint.pt").exists()
        # a run stopped before its first checkpoint has nothing to continue: start it again
        restart = args.resume and not resume and run_dir.exists()
        train(cfg, run_dir, resume=resume, overwrite=args.overwrite or restart, quiet=args.quiet, data=data,
              on_epoch=None if args.quiet else _print_epoch)
    title = f"{', '.join(entries)} on {configs[0].model} / {configs[0].data}, seed {configs[0].seed}"
    command = "bpfree " + " ".join(shlex.quote(a) for a in argv)
    print(write_comparison(run_dirs, out, title, labels=entries, command=command))
    print(f"-> {out}/summary.md, summary.json, accuracy_vs_epoch.png, accuracy_vs_time.png")
    return 0


def _transfer_rank(args) -> int:
    data = load_data(args.data, data_dir=args.data_dir, train_subset=args.train_subset)
    candidates = {}
    for run_dir in args.modules:
        rule = load_trained(run_dir)
        if tuple(rule.net.in_shape) != tuple(data.in_shape):
            raise BpfreeError(f"{run_dir} was trained on inputs of shape {tuple(rule.net.in_shape)}, "
                              f"{args.data} has {tuple(data.in_shape)}")
        candidates[str(run_dir)] = rule
    ranked = rank_sources(candidates, data, proxy=args.proxy)
    if args.json:
        print(json.dumps([{"run": name, "score": score} for name, score in ranked], indent=2))
    else:
        width = max(len(name) for name, _ in ranked)
        print(f"{'rank':>4}  {'run':<{width}}  {args.proxy}")
        for i, (name, score) in enumerate(ranked, 1):
            print(f"{i:>4}  {name:<{width}}  {score:.4f}")
    return 0


def _list() -> int:
    print("methods (learning rules):")
    for name, desc in list_rules().items():
        rule = get_rule(name)
        print(f"  {name:<14} {desc}  [schedules: {', '.join(rule.schedules)}; default {rule.default_schedule}]")
        for f in dataclasses.fields(rule.Options):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f" {{{','.join(f.metadata['choices'])}}}" if f.metadata.get("choices") else ""
            print(f"      --{f.name.replace('_', '-')}{choices} (default {default}): {f.metadata.get('help', '')}")
    print("models:")
    for name, desc in list_models().items():
        print(f"  {name:<14} {desc}")
    print("datasets:")
    for name, desc in list_datasets().items():
        print(f"  {name:<14} {desc}")
    return 0


def main(argv=None) -> int:
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args, extra = _parser().parse_known_args(argv)
        if args.command == "list":
            if extra:
                raise BpfreeError(f"unrecognized argument {extra[0]!r} (see: bpfree list --help)")
            return _list()
        if args.command == "transfer-rank":
            if extra:
                raise BpfreeError(f"unrecognized argument {extra[0]!r} (see: bpfree transfer-rank --help)")
            return _transfer_rank(args)
        return _train(args, extra) if args.command == "train" else _compare(args, extra, argv)
    except BpfreeError as e:
        print(f"bpfree: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("bpfree: interrupted; the last finished epoch is checkpointed: continue with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
