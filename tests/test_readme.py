"""The README's shell commands run as written: every `bpfree` command line in its bash blocks parses,
and each one that can train on tiny data does, with only the dataset, the budget, the device and the
output folder swapped for small ones (the flags under test are kept as the README gives them)."""
import re
import shlex
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from bpfree.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
# commands that need what CI has not: a GPU-sized suite (minutes to hours), a second machine
NOT_RUN = ("--profile full", "--profile gpu", "--profile quick", "--nnodes 2")


def readme_commands() -> list[str]:
    """Every `bpfree ...` / `torchrun ... -m bpfree ...` line of the README's bash blocks, continuation
    lines joined, comments and `pip install ... &&` prefixes dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            line = line.split("&& ")[-1] if line.startswith("pip install") else line
            if line.startswith(("bpfree ", "torchrun ")):
                commands.append(line)
    return commands


def test_the_readme_has_commands_to_check():
    commands = readme_commands()
    assert len(commands) >= 10 and any("--parallel 2" in c for c in commands)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A small image folder (two classes of 12x12 PNGs) and a small text file."""
    from PIL import Image
    root = tmp_path_factory.mktemp("readme")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for c in ("daisy", "rose"):
            (root / "flowers" / split / c).mkdir(parents=True)
            for i in range(n):
                level = 60 if c == "daisy" else 190
                pixels = np.clip(rng.normal(level, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / "flowers" / split / c / f"{i}.png")
    text = root / "corpus.txt"
    text.write_bytes((Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_bytes() * 3)
    return {"flowers": root / "flowers", "text": text, "root": root}


def small(argv: list[str], tiny: dict, out: Path) -> list[str]:
    """`argv` (after `bpfree`) with the dataset, budget, device and output folder made small."""
    data = {"fashion-mnist": "digits", "cifar10": "digits", "/data/flowers": str(tiny["flowers"]),
            "corpus.txt": str(tiny["text"])}
    args, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--data", "--device", "--out", "--epochs", "--precision") and i + 1 < len(argv):
            value = argv[i + 1]
            if a == "--data":
                kind, _, where = value.rpartition(":")
                args += [a, f"{kind}:{data[where]}" if kind else data.get(value, value)]
            i += 2
            continue
        args.append(a)
        i += 1
    text = any(a.startswith("text:") for a in args)
    extra = ["--epochs", "1", "--device", "cpu", "--threads", "1", "--quiet"]
    extra += ["--context", "32", "--model-opt", "dim=32"] if text else []
    if args[0] == "train" and not text and "imagefolder" not in " ".join(args):
        extra += ["--train-subset", "300"]
    if args[0] in ("train", "compare"):
        extra += ["--out", str(out), "--overwrite"]
    if "--config" in args:     # a GPU recipe on digits
        extra += ["--data", "digits"]
    return args + extra


@pytest.mark.parametrize("command", [c for c in readme_commands() if not c.startswith("torchrun")])
def test_a_readme_command_runs_on_tiny_data(command, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))                    # the image cache goes to ~/.cache
    argv = shlex.split(command)[1:]
    if any(skip in command for skip in NOT_RUN) or argv[0] == "report":
        with pytest.raises(SystemExit) as parsed:          # parses: the flags exist as written
            main(argv + ["--help"])
        assert parsed.value.code == 0
        return
    monkeypatch.chdir(Path(__file__).resolve().parents[1])          # configs/... as the README says
    code = main(small(argv, tiny, tmp_path / "run"))
    assert code == 0, capsys.readouterr().err
    assert "Traceback" not in capsys.readouterr().err
    run = tmp_path / "run"          # `bpfree report runs/x runs/x/*`: the files among them are skipped
    assert main(["report", str(run), *map(str, sorted(run.glob("*"))), "--out", str(tmp_path / "rep")]) == 0
    assert main(["report", str(run), str(run / "missing"), "--out", str(tmp_path / "rep2")]) == 2
    assert "missing does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.startswith("torchrun")])
def test_the_readme_torchrun_commands_parse(command):
    argv = shlex.split(command)
    with pytest.raises(SystemExit) as parsed:
        main(argv[argv.index("bpfree") + 1:] + ["--help"])
    assert parsed.value.code == 0
