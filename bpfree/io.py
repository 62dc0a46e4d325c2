"""Files written so that a crash never leaves a torn one, and read without executing code:
atomic writes, checkpoints (weights-only `torch.load`), stage weights as safetensors, provenance.

Every file is written to a temporary name in the same directory and renamed into place, so a
crash leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import BpfreeError, first_line
from .version import __version__


@functools.cache
def provenance() -> dict:
    """What produced a run: the bpfree version and, when bpfree runs from a git checkout, its commit
    (with "-dirty" when the checkout has uncommitted changes)."""
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
