"""The run directory: config.json, metrics.jsonl, metrics.json, atomic checkpoints, resume.

Layout of a run directory::

    config.json       the RunConfig that alone reproduces the run
    metrics.jsonl     one JSON line per epoch
    metrics.json      the final summary
    checkpoint.pt     last completed epoch: stage states, RNG states, progress (weights_only load)
    model.safetensors the trained stages' weights, prefixed by stage index ("0.net.blocks...")

Every file is written atomically (`bpfree.io`), so a crash leaves either the old file or the new
one, never a torn one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import RunConfig
from .errors import BpfreeError
from .io import atomic_write, write_json


class RunDir:
    """A run's directory; refuses to clobber an earlier run unless told to resume or overwrite."""

    def __init__(self, path, *, resume: bool = False, overwrite: bool = False):
        """Check that the directory may be used; nothing is touched until `create`."""
        self.path, self.resume, self.overwrite = Path(path), resume, overwrite
        if resume and overwrite:
            raise BpfreeError("choose one of --resume and --overwrite, not both")
        if self.path.exists() and not self.path.is_dir():
            raise BpfreeError(f"output path {self.path} exists and is not a directory; choose another --out")
        self.existing = self.path.is_dir() and any(self.path.iterdir())
        if resume and not (self.path / "checkpoint.pt").exists():
            raise BpfreeError(f"nothing to resume in {self.path}: no checkpoint.pt; run without --resume")
        if self.existing and not (resume or overwrite):
            raise BpfreeError(f"run directory {self.path} already exists; pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --out")
        if overwrite and self.existing:
            self._check_is_run(self.path)

    def create(self) -> "RunDir":
        """Make the directory (replacing an earlier run only under --overwrite) and check it is writable."""
        if self.overwrite and self.existing:
            shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise BpfreeError(f"cannot write to output directory {self.path}: {e.strerror}") from None
        return self

    @staticmethod
    def _check_is_run(path: Path) -> None:
        # --overwrite deletes a directory: only ever one that bpfree made.
        if not (path / "config.json").exists():
            raise BpfreeError(f"--overwrite refuses to delete {path}: it is not a bpfree run directory")

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: dict) -> None:
        write_json(self.file("config.json"), config)

    def read_config(self) -> dict:
        with open(self.file("config.json")) as f:
            return json.load(f)

    def write_metrics_rows(self, rows: list[dict]) -> None:
        """Rewrite metrics.jsonl with exactly these rows (resume drops rows past the checkpoint)."""
        def write(tmp):
            with open(tmp, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        atomic_write(self.file("metrics.jsonl"), write)

    def read_metrics_rows(self) -> list[dict]:
        path = self.file("metrics.jsonl")
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: dict) -> None:
        write_json(self.file("metrics.json"), summary)


def read_run(path) -> tuple[dict, list[dict], dict]:
    """(config, epoch rows, final summary) of a finished run directory, for reports. Settings added to
    bpfree after the run was made are filled in with their defaults (which reproduce the behaviour
    before they existed), so old and new runs of the same experiment compare as one."""
    path = Path(path)
    try:
        config = {**RunConfig().to_dict(), **json.loads((path / "config.json").read_text())}
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
        summary = json.loads((path / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BpfreeError(f"{path} is not a finished bpfree run: {e}") from None
    return config, rows, summary


# --- where users watch their runs: metrics.csv and TensorBoard beside metrics.jsonl -------------------
def flat_row(row: dict) -> dict[str, float]:
    """An epoch's metrics as flat numbers: epoch, step, test_acc, ..., and per stage `NAME/loss`,
    `NAME/train_acc`, `NAME/test_acc` (its own readout)."""
    out = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for stage in row.get("stages", []):
        out.update({f"{stage['name']}/{k}": v for k, v in stage.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def check_logs(kinds: str) -> None:
    """Refuse a log this machine cannot write, before anything is trained."""
    if "tensorboard" in kinds.split(","):
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise BpfreeError("--log tensorboard needs the tensorboard package: pip install 'bpfree[tensorboard]' "
                              "(or --log csv)") from None


def epoch_loggers(kinds: str, run: RunDir, rows: list[dict]) -> list:
    """Callbacks run after each epoch's row is saved (`rows`: those done before, on resume)."""
    loggers = []
    for kind in kinds.split(","):
        if kind == "csv":
            loggers.append(lambda row: _write_csv(run))
        elif kind == "tensorboard":
            loggers.append(_TensorBoard(run.file("tensorboard"), rows[-1]["step"] + 1 if rows else 0))
    return loggers


def _write_csv(run: RunDir) -> None:
    """metrics.csv from metrics.jsonl (so the two never disagree), one line per epoch, written atomically."""
    import csv
    rows = [flat_row(r) for r in run.read_metrics_rows()]
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(run.file("metrics.csv"), write)


class _TensorBoard:
    """Each epoch's metrics as scalars at its training step (mid-epoch evaluations at theirs); a resumed
    run purges what an interrupted one wrote after its last checkpoint."""

    def __init__(self, path: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(path), purge_step=first_step)

    def __call__(self, row: dict) -> None:
        for name, value in flat_row(row).items():
            if name not in ("epoch", "step"):
                self.writer.add_scalar(name, value, row["step"])
        for evaluation in row.get("step_evals", []):
            for name, value in evaluation.items():
                if name != "step":
                    self.writer.add_scalar(f"step_evals/{name}", value, evaluation["step"])
        self.writer.flush()
