"""The `bpfree` command: parses arguments, builds a RunConfig, calls the library. No logic of its own.

The run flags are RunConfig's fields (`bpfree.options`: type, help, choices); a method's
hyperparameters (its `Options` dataclass) become extra flags the same way, e.g.
`bpfree train --method bwbpf --aux-head conv`; `bpfree list` shows them.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import re
import shlex
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .bench import PROFILES, run_bench, write_report
from .config import RunConfig
from .data import list_datasets, load_data
from .errors import BpfreeError
from .estimators import ESTIMATORS
from .models import list_models
from .options import field_types, flag, parse_text, without_none
from .report import epoch_line, human_bytes, write_comparison
from .rules import get_rule, list_rules, make_options
from .run import load_for, load_trained, train
from .transfer import PROXIES, score_sources


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (exit 2), not usage + message."""

    def error(self, message):
        raise BpfreeError(f"{message} (see: {self.prog} --help)")


def _pair(text: str) -> tuple[str, str]:
    """"KEY=VALUE" -> (key, raw value text); dashes in the key become underscores."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip().replace("-", "_"), raw


def key_value(text: str) -> list[tuple[str, object]]:
    """Model options: KEY=VALUE[,KEY=VALUE...], each VALUE read as a Python literal when it is one:
    "widths=64,64" is one option (a list), "patch=4,dim=64" two (a comma starts a new option only
    where a KEY= follows)."""
    pairs = []
    for part in re.split(r",(?=\s*[A-Za-z_][\w-]*\s*=)", text):
        key, raw = _pair(part)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        pairs.append((key, value))
    return pairs


def _field_flag(f: dataclasses.Field, kind) -> dict:
    """argparse settings that turn a flag's text into the field's type; a dict field is KEY=VALUE, repeatable."""
    if without_none(kind) is dict:
        return {"type": key_value, "action": "extend"}
    settings = {"type": functools.partial(parse_text, f, kind)}
    if without_none(kind) is bool:         # `--stream` alone is true; `--stream false` still reads
        settings.update(nargs="?", const=True)
    if without_none(kind) is str and f.metadata.get("choices"):
        settings["choices"] = f.metadata["choices"]
    return settings


def _add_run_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per RunConfig field, made from its type and metadata (help, choices, metavar)."""
    defaults, kinds = RunConfig(), field_types(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        default = getattr(defaults, f.name)
        text = f.metadata.get("help", "")
        metavar = f.metadata.get("metavar") or ("true|false" if without_none(kinds[f.name]) is bool else None)
        p.add_argument(flag(f), dest=f.name, metavar=metavar,
                       help=f"{text} (default {default})" if default not in (None, {}) else text,
                       **_field_flag(f, kinds[f.name]))
    p.add_argument("--config", help="start from a run's config.json (flags given here override it)")
    p.add_argument("--overwrite", action="store_true", default=False, help="replace an existing run directory")
    p.add_argument("--quiet", action="store_true", default=False, help="no progress bar or per-epoch lines")
    p.add_argument("--progress-every", type=float, default=60.0, metavar="S", dest="progress_s",
                   help="when stderr is no terminal (nohup, SLURM): a progress line every S seconds within an "
                        "epoch (default 60)")


def _parser() -> _Parser:
    parser = _Parser(prog="bpfree", description="Train deep networks without end-to-end backpropagation.")
    parser.add_argument("--version", action="version", version=f"bpfree {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    epilog = "Each method's own options are extra flags (e.g. --aux-head conv); `bpfree list` shows them."
    t = sub.add_parser("train", help="train one network with one learning rule", epilog=epilog,
                       argument_default=argparse.SUPPRESS)
    t.add_argument("--out", help="run directory (default runs/METHOD-MODEL-DATA)")
    t.add_argument("--resume", action="store_true", default=False,
                   help="continue the run in --out as it was configured (a flag that differs is refused)")
    t.add_argument("--parallel", type=int, nargs="?", const=0, metavar="W",
                   help="train the stages on W processes, pipelined (torch.distributed); without W, under "
                        "torchrun, this process is one of torchrun's ranks")
    t.add_argument("--in-flight", type=int, default=2, metavar="N",
                   help="--parallel: batches queued between neighbouring processes (default 2)")
    t.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="--parallel: a rank silent for S seconds (hung, not dead) stops the run, named (default 600)")
    _add_run_options(t)
    c = sub.add_parser("compare", help="train several rules on identical model, data and seed",
                       epilog=epilog, argument_default=argparse.SUPPRESS)
    c.add_argument("--methods", required=True,
                   help="comma-separated rules, each NAME or NAME[key=value,...] (a rule option or a run "
                        "setting, e.g. dgl[schedule=sequential]); the first is the reference")
    c.add_argument("--out", help="comparison directory (default runs/compare-MODEL-DATA)")
    c.add_argument("--resume", action="store_true", default=False,
                   help="keep finished runs in --out, resume unfinished ones")
    _add_run_options(c, skip=("method",))
    r = sub.add_parser("transfer-rank", help="score trained runs' frozen hidden modules on a target dataset "
                       "by transferability estimators, without training")
    r.add_argument("--modules", nargs="+", required=True, metavar="RUN_DIR", help="finished run directories")
    r.add_argument("--data", required=True, help="target dataset name or npz:PATH")
    r.add_argument("--data-dir", help="where dataset files are")
    r.add_argument("--train-subset", type=int, help="score on a seeded subset of N target examples")
    r.add_argument("--estimator", default="logme",
                   help=f"comma-separated, ranked by the first: {', '.join(ESTIMATORS.names())} (default logme)")
    r.add_argument("--proxy", default="alignment", choices=PROXIES,
                   help="the kernel estimator's proxy objective (default alignment)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    b = sub.add_parser("bench", help="every rule against E2EBP and checkpointed E2EBP: a profile of comparisons "
                       "(finished runs are skipped), then `report` on them",
                       epilog="Other flags (--threads, --device, --data-dir, ...) are passed to every comparison.")
    b.add_argument("--profile", default="quick", choices=list(PROFILES),
                   help="; ".join(f"{k}: {v[0]}" for k, v in PROFILES.items()))
    b.add_argument("--out", help="results folder (default runs/bench-PROFILE)")
    b.add_argument("--only", metavar="PATTERN", help="only the suites whose name matches this shell-style pattern")
    b.add_argument("--dry-run", action="store_true", help="print the comparisons without running them")
    rp = sub.add_parser("report", help="results.md, results.json and plots from finished run directories")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or folders holding them")
    rp.add_argument("--out", required=True, help="where to write results.md, results.json and the plots")
    ls = sub.add_parser("list", help="rules (with their options), models and datasets; or one kind, filtered")
    ls.add_argument("kind", nargs="?", metavar="{rules,models,datasets}", help="list only this kind")
    ls.add_argument("pattern", nargs="?", help="only names matching this shell-style pattern, e.g. 'resnet*'")
    return parser


# --- method options as flags ---------------------------------------------------------------
def _method_options(methods: list[str], extra: list[str]) -> dict[str, dict]:
    """Parse leftover flags as the methods' own options; each method gets the ones it declares."""
    declared: dict[str, tuple] = {}
    for m in methods:
        options_cls = get_rule(m).Options
        for f in dataclasses.fields(options_cls):
            declared.setdefault(f.name, (f, field_types(options_cls)[f.name]))
    p = _Parser(prog="bpfree (method options)", add_help=False, argument_default=argparse.SUPPRESS)
    for name, (f, kind) in declared.items():
        p.add_argument(flag(f), dest=name, **_field_flag(f, kind))
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


def _config(args: argparse.Namespace, method: str, rule_options: dict, overrides: dict | None = None,
            base_file=None) -> RunConfig:
    """`base_file`'s values (a resumed run's config.json), else --config's, else the defaults; then
    the flags given, then a compare entry's `overrides`."""
    base_file = base_file or getattr(args, "config", None)
    base = RunConfig.load(base_file).to_dict() if base_file else RunConfig().to_dict()
    given = {k: v for k, v in vars(args).items() if k in base}
    if "model_options" in given:                 # --model-opt pairs replace the config's model options
        given["model_options"] = dict(given["model_options"])
    given.update(overrides or {})
    base.update(given)
    if "split" in given and isinstance(base["model_options"], dict):   # a split given here wins
        base["model_options"] = {k: v for k, v in base["model_options"].items() if k != "split"}
    base["method"] = method
    base["rule_options"] = {**(base.get("rule_options") or {}), **rule_options}
    return RunConfig.from_dict(base)


def _slug(spec: str) -> str:
    return Path(spec[4:]).stem if spec.startswith("npz:") else spec


def _print_epoch(row: dict) -> None:
    print(epoch_line(row), flush=True)


def _train(args, extra) -> int:
    def config_over(base_file) -> RunConfig:
        method = getattr(args, "method", None) or (RunConfig.load(base_file).method if base_file
                                                   else RunConfig().method)
        return _config(args, method, _method_options([method], extra)[method], base_file=base_file)
    out = getattr(args, "out", None)
    if out is None:
        first = config_over(getattr(args, "config", None))
        out = f"runs/{first.method}-{first.model}-{_slug(first.data)}"
    saved = Path(out) / "config.json"
    # on --resume, the run's own settings with the flags given on top: train() refuses any that differ
    cfg = config_over(saved if args.resume and saved.is_file() else getattr(args, "config", None))
    quiet = args.quiet
    summary = train(cfg, out, resume=args.resume, overwrite=args.overwrite, quiet=quiet,
                    on_epoch=None if quiet else _print_epoch, parallel=getattr(args, "parallel", None),
                    in_flight=args.in_flight, timeout_s=args.timeout, progress_s=args.progress_s)
    if summary is None:    # a torchrun rank other than 0: rank 0 reports
        return 0
    print(f"{summary['method']} on {summary['model']}/{summary['data']}: test accuracy "
          f"{100 * summary['test_accuracy']:.2f}% after {summary['epochs']} epochs, "
          f"{summary['train_time_s']:.1f} s training, {summary['samples_per_s']:.0f} samples/s, "
          f"peak activation memory {human_bytes(summary['peak_activation_bytes'])} -> {out}")
    return 0


def split_entries(text: str) -> list[str]:
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


def parse_entry(entry: str) -> tuple[str, dict[str, str]]:
    """`bwbpf[variant=deep-supervision,lr=0.01]` -> ("bwbpf", {"variant": "deep-supervision", "lr": "0.01"})."""
    match = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?", entry)
    if not match:
        raise BpfreeError(f"bad --methods entry {entry!r}; write NAME or NAME[key=value,...]")
    name, inner = match.group(1), match.group(2)
    try:
        settings = dict(_pair(kv) for kv in split_entries(inner or ""))
    except argparse.ArgumentTypeError as e:
        raise BpfreeError(f"bad --methods entry {entry!r}: {e}") from None
    return name, settings


# RunConfig fields a compare entry may set; other keys are the method's options
_ENTRY_SETTINGS = {f.name for f in dataclasses.fields(RunConfig)} - {"method", "model_options", "rule_options"}


def entry_settings(name: str, settings: dict[str, str]) -> tuple[dict, dict]:
    """A NAME[key=value,...] entry's settings, typed: (RunConfig overrides, the rule's options)."""
    overrides, rule_options = {}, {}
    for key, text in settings.items():
        if key in _ENTRY_SETTINGS:
            overrides[key] = _typed(RunConfig, key, text)
        else:    # a rule option (make_options names the valid ones when it is not)
            rule_options[key] = _typed(get_rule(name).Options, key, text)
    return overrides, rule_options


def _typed(cls, key: str, text: str):
    """A NAME[key=value] value read as the flag --key reads it; text as given if `cls` has no such field."""
    f = next((f for f in dataclasses.fields(cls) if f.name == key), None)
    return text if f is None else parse_text(f, field_types(cls)[key], text)


def _compare(args, extra, argv: list[str]) -> int:
    entries = split_entries(args.methods)
    if not entries:
        raise BpfreeError("--methods needs at least one method; see `bpfree list`")
    if len(set(entries)) != len(entries):
        raise BpfreeError(f"--methods lists an entry twice: {args.methods}")
    parsed = [parse_entry(e) for e in entries]
    names = list(dict.fromkeys(name for name, _ in parsed))
    options = _method_options(names, extra)
    configs = []
    for name, settings in parsed:
        overrides, rule_options = entry_settings(name, settings)
        cfg = _config(args, name, {**options[name], **rule_options}, overrides)
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
            data = load_for(cfg)
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
    print(f"-> {out}/summary.md, summary.json, accuracy_vs_epoch.png, accuracy_vs_time.png, "
          "accuracy_vs_step.png")
    return 0


def _transfer_rank(args) -> int:
    estimators = [e.strip() for e in args.estimator.split(",") if e.strip()]
    if not estimators:
        raise BpfreeError("--estimator needs at least one name")
    for name in estimators:
        ESTIMATORS.get(name)                  # an unknown name fails before any run is read
    data = load_data(args.data, data_dir=args.data_dir, train_subset=args.train_subset)
    candidates = {}
    for run_dir in args.modules:
        rule = load_trained(run_dir)
        if tuple(rule.net.in_shape) != tuple(data.in_shape):
            raise BpfreeError(f"{run_dir} was trained on inputs of shape {tuple(rule.net.in_shape)}, "
                              f"{args.data} has {tuple(data.in_shape)}")
        candidates[str(run_dir)] = rule
    table = score_sources(candidates, data, estimators, proxy=args.proxy)
    first = estimators[0]
    ranked = sorted(table, key=lambda n: (table[n][first]["score"] is None, -(table[n][first]["score"] or 0), n))
    if args.json:
        print(json.dumps([{"run": n, "score": table[n][first]["score"], "forward_s": table[n]["forward_s"],
                           "scores": {e: table[n][e] for e in estimators}} for n in ranked], indent=2))
        return 0
    width = max(len(n) for n in ranked)
    labels = {e: e + (f" ({args.proxy})" if e == "kernel" else "") for e in estimators}
    widths = {e: max(10, len(label)) + 2 for e, label in labels.items()}
    print(f"{'rank':>4}  {'run':<{width}}  {'forward':>8}" + "".join(
        f"{labels[e]:>{widths[e]}}{'time':>9}" for e in estimators))
    for i, n in enumerate(ranked, 1):
        cells = [f"{'n/a':>{widths[e]}}{'':>9}" if table[n][e]["score"] is None
                 else f"{table[n][e]['score']:>{widths[e]}.4f}{table[n][e]['seconds']:>8.2f}s" for e in estimators]
        print(f"{i:>4}  {n:<{width}}  {table[n]['forward_s']:>7.2f}s" + "".join(cells))
    return 0


_KINDS = {"rules": "methods (learning rules)", "models": "models", "datasets": "datasets"}


def _list(kind: str | None = None, pattern: str | None = None) -> int:
    """`bpfree list [rules|models|datasets] [PATTERN]`; a lone PATTERN filters every kind."""
    kind = "rules" if kind == "methods" else kind
    if kind is not None and kind not in _KINDS:
        if pattern is not None:
            raise BpfreeError(f"bpfree list shows rules, models or datasets, got {kind!r}")
        kind, pattern = None, kind
    found = {"rules": list_rules(pattern), "models": list_models(pattern), "datasets": list_datasets(pattern)}
    shown = [kind] if kind else [k for k in _KINDS if found[k] or pattern is None]
    if not shown:
        print(f"no rule, model or dataset matches {pattern!r}")
    for k in shown:
        print(f"{_KINDS[k]}:")
        if not found[k]:
            print(f"  (none matches {pattern!r})")
        for name, desc in found[k].items():
            if k == "rules":
                _print_rule(name, desc)
            else:
                print(f"  {name:<14} {desc}")
    return 0


def _print_rule(name: str, desc: str) -> None:
    rule = get_rule(name)
    print(f"  {name:<14} {desc}  [schedules: {', '.join(rule.schedules)}; default {rule.default_schedule}]")
    print(f"      predicts with: {rule.predicts_through or 'the network itself (your module predicts as the rule)'}")
    print(f"      locality: {rule.locality}; update-locked: {'yes' if rule.update_locked else 'no'}")
    for f in dataclasses.fields(rule.Options):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f" {{{','.join(f.metadata['choices'])}}}" if f.metadata.get("choices") else ""
        print(f"      {flag(f)}{choices} (default {default}): {f.metadata.get('help', '')}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers such as SLURM send before they kill a job), stopping a run like Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args, extra = _parser().parse_known_args(argv)
        if args.command == "list":
            if extra:
                raise BpfreeError(f"unrecognized argument {extra[0]!r} (see: bpfree list --help)")
            return _list(args.kind, args.pattern)
        if args.command == "transfer-rank":
            if extra:
                raise BpfreeError(f"unrecognized argument {extra[0]!r} (see: bpfree transfer-rank --help)")
            return _transfer_rank(args)
        if args.command == "bench":
            out = Path(args.out or f"runs/bench-{args.profile}")
            run_bench(args.profile, out, extra, only=args.only, dry_run=args.dry_run, run=main)
            if not args.dry_run:
                print(write_report([out], out, command="bpfree " + " ".join(shlex.quote(a) for a in argv)))
                print(f"-> {out}/results.md, results.json, group*-accuracy.png, group*-memory.png")
            return 0
        if args.command == "report":
            if extra:
                raise BpfreeError(f"unrecognized argument {extra[0]!r} (see: bpfree report --help)")
            print(write_report(args.runs, Path(args.out), command="bpfree " + " ".join(shlex.quote(a) for a in argv)))
            return 0
        return _train(args, extra) if args.command == "train" else _compare(args, extra, argv)
    except BpfreeError as e:
        print(f"bpfree: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        how = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(f"bpfree: {how}; the last finished epoch is checkpointed: continue with --resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
