"""The run directory: config.json, metrics.jsonl, metrics.json, atomic checkpoints, resume.

Layout of a run directory::

    config.json       the RunConfig that alone reproduces the run
    metrics.jsonl     one JSON line per epoch
    metrics.json      the final summary
    checkpoint.pt     last completed epoch: stage states, RNG states, progress (weights_only load)
    model.safetensors the trained stages' weights, prefixed by stage index ("0.net.blocks...")

Every file is written to a temporary name in the same directory and renamed into place, so a
crash leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import BpfreeError, first_line


@functools.cache
def provenance() -> dict:
    """What produced a run: the bpfree version and, when bpfree runs from a git checkout, its commit
    (with "-dirty" when the checkout has uncommitted changes)."""
    from . import __version__
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        commit = head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"bpfree_version": __version__, "git_commit": commit}


@functools.cache
def _umask() -> int:
    mask = os.umask(0)          # the only way to read it is to set it: read once, put it back
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it over `path`: a crash
    leaves the old file (or none), never part of one. The file gets the permissions a plain `open`
    would give it (mkstemp's are owner-only: results a lab's group could not read)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())     # after: a writer may have replaced the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint without executing code: `weights_only=True` refuses pickled objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BpfreeError(f"no checkpoint at {path}; start the run without --resume") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise BpfreeError(f"refusing to load checkpoint {path}: not a safe weights-only file "
                          f"({first_line(e)})") from None


def save_weights(path: Path, stages) -> None:
    tensors = {f"{k}.{name}": t.detach().cpu().contiguous().clone()
               for k, stage in enumerate(stages) for name, t in stage.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_weights(path: Path, stages, indices=None) -> None:
    """Load the weights of `stages` (or only those at `indices`) from a model.safetensors file."""
    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise BpfreeError(f"cannot read weights {path}: {e}") from None
    for k, stage in enumerate(stages):
        if indices is not None and k not in indices:
            continue
        prefix = f"{k}."
        try:
            stage.load_state_dict({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)})
        except RuntimeError as e:
            # torch lists missing / unexpected keys and shape mismatches on the lines after its header
            detail = " ".join(" ".join(str(e).splitlines()[1:]).split()) or first_line(e)
            raise BpfreeError(f"stage {k} in {path} does not fit this model (another architecture, rule option "
                              f"or bpfree version wrote it): {detail[:300]}") from None


def parse_module_spec(spec: str) -> tuple[Path, list[int]]:
    """"RUN_DIR:0-1" (or RUN_DIR:0, RUN_DIR:0,1) -> (run directory, stage indices)."""
    path, _, which = spec.rpartition(":")
    try:
        if "-" in which:
            lo, hi = (int(v) for v in which.split("-"))
            indices = list(range(lo, hi + 1))
        else:
            indices = [int(v) for v in which.split(",")]
    except ValueError:
        indices = []
    if not path or not indices or min(indices) < 0:
        raise BpfreeError(f"--init-modules expects RUN_DIR:FIRST-LAST stage indices (e.g. runs/a:0-1), got {spec!r}")
    if not (Path(path) / "model.safetensors").exists():
        raise BpfreeError(f"--init-modules: {path} has no model.safetensors (is it a finished run?)")
    return Path(path), indices


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
    from .config import RunConfig  # here: config imports the rules, which import this module
    path = Path(path)
    try:
        config = {**RunConfig().to_dict(), **json.loads((path / "config.json").read_text())}
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
        summary = json.loads((path / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BpfreeError(f"{path} is not a finished bpfree run: {e}") from None
    return config, rows, summary
