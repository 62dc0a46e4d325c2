"""The image-folder data path: decode once, load from the cache, and stream, against the in-memory path.

    python bench/image_folder.py [--train 2000] [--test 500] [--rounds 2] [--data fashion-mnist]
                                 [--out bench/results/image-folder]

Writes Fashion-MNIST images (or --data's) as PNG files in a scratch image folder (PATH/train/CLASS,
PATH/test/CLASS), then measures: the first `load_data("imagefolder:PATH")` (decode every file with
Pillow and write the uint8 cache), a second one (read the cache), and training samples/s of one epoch of the cnn
(backprop, batch 128, 2 threads) from the in-memory cache and from `--stream` with 0, 1 and 2
DataLoader workers, interleaved round by round (medians). Writes image-folder.json and .md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bpfree import data as D  # noqa: E402
from bpfree.config import RunConfig  # noqa: E402
from bpfree.run import train  # noqa: E402


def write_folder(root: Path, n_train: int, n_test: int, source: str = "fashion-mnist") -> None:
    from PIL import Image
    fm = D.load_data(source)
    for split, x, y, n in (("train", fm.x_train, fm.y_train, n_train), ("test", fm.x_test, fm.y_test, n_test)):
        if x.is_floating_point():       # inputs normalised at load (digits): back to 0-255 grey levels
            x = ((x - x.min()) / (x.max() - x.min()) * 255).round().to(torch.uint8)
        for i in range(n):
            folder = root / split / f"class{int(y[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i, 0].numpy()).save(folder / f"{i:05d}.png")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data", default="fashion-mnist", help="the grey-level data set whose images are written")
    p.add_argument("--out", default="bench/results/image-folder")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    scratch = Path(tempfile.mkdtemp(prefix="bpfree-bench-"))
    D.CACHE = scratch / "cache"
    root = scratch / "folder"
    write_folder(root, args.train, args.test, args.data)
    spec = f"imagefolder:{root}"
    begin = time.perf_counter()
    D.load_data(spec)
    decode_s = time.perf_counter() - begin
    begin = time.perf_counter()
    D.load_data(spec)
    cached_s = time.perf_counter() - begin
    paths = {"in memory (cached)": {}, "stream, 0 workers": {"stream": True, "workers": 0},
             "stream, 1 worker": {"stream": True, "workers": 1}, "stream, 2 workers": {"stream": True, "workers": 2}}
    rates = {name: [] for name in paths}
    accs = {}
    for rnd in range(args.rounds):
        for name, extra in paths.items():
            cfg = RunConfig(method="backprop", model="cnn", data=spec, epochs=1, threads=2, **extra)
            summary = train(cfg, quiet=True)
            rates[name].append(summary["samples_per_s"])
            accs[name] = summary["test_accuracy"]
            print(f"round {rnd + 1} {name:<20} {summary['samples_per_s']:8.1f} samples/s", flush=True)
    result = {"command": "python bench/image_folder.py " + " ".join(shlex.quote(a) for a in argv),
              "data": args.data, "train_images": args.train, "test_images": args.test, "decode_once_s": decode_s,
              "cached_load_s": cached_s, "samples_per_s": {k: statistics.median(v) for k, v in rates.items()},
              "test_accuracy": accs, "rounds": rates, "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "image-folder.json").write_text(json.dumps(result, indent=2) + "\n")
    ref = result["samples_per_s"]["in memory (cached)"]
    lines = [f"# Image folder ({args.train} + {args.test} {args.data} PNGs): decode, cache, stream", "",
             f"Command: `{result['command']}` (2 threads; medians of {args.rounds} interleaved rounds)", "",
             f"Decode once (Pillow, then write the uint8 cache): {decode_s:.2f} s; load from the cache: "
             f"{cached_s:.2f} s.", "", "| data path (cnn, backprop, 1 epoch) | samples/s | vs in memory | test acc |",
             "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v:.0f} | {v / ref:.2f}x | {100 * accs[k]:.2f}% |" for k, v in result["samples_per_s"].items()]
    (out / "image-folder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
