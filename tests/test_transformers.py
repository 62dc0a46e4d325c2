"""Transformers: `vit` on images and `gpt` on a file's bytes (`--data text:PATH`), every applicable
rule trained block by block, the others refused with their reason."""
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from bpfree import BpfreeError, RunConfig, create_model, list_rules, train
from bpfree.cli import main
from bpfree.data import load_data

VIT = {"patch": 4, "dim": 32, "depth": 4, "heads": 4}
GPT = {"dim": 32, "depth": 4, "heads": 4}
APPLIES = {"vit": {"backprop", "bwbpf", "dgl", "auglocal", "al", "kernel", "infopro", "predsim"},
           "gpt": {"backprop", "bwbpf", "dgl", "auglocal", "infopro"}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Real text every machine has: the sources of Python's own json package (about 50 kB)."""
    files = sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py"))
    path = tmp_path_factory.mktemp("text") / "json.py.txt"
    path.write_bytes(b"".join(f.read_bytes() for f in files))
    return path


def config(model: str, method: str, corpus: Path, **overrides) -> RunConfig:
    values = dict(method=method, model=model, blocks=4, epochs=2, lr=3e-3, threads=1,
                  model_options=VIT if model == "vit" else GPT)
    if model == "gpt":
        values.update(data=f"text:{corpus}", context=32, batch_size=32)
    else:
        values.update(data="digits", batch_size=64)
    return RunConfig(**{**values, **overrides})


def test_models_are_units_of_transformer_blocks_and_check_their_options():
    net = create_model("vit", 10, (1, 8, 8), blocks=4, **VIT)
    assert net.block_shapes() == [(5, 32)] * 4 and not net.per_position           # 4 patches + class token
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    lm = create_model("gpt", 256, (16,), blocks=2, **GPT)
    assert lm.per_position and lm(torch.randint(0, 256, (3, 16))).shape == (3, 16, 256)
    assert create_model("vit", 10, (1, 8, 8), blocks=4, pool="mean", **{**VIT, "depth": 4}).num_blocks == 4
    for bad, said in ((lambda: create_model("vit", 10, (1, 8, 8), patch=3), "patch must divide the image side"),
                      (lambda: create_model("vit", 10, (64,)), "needs image input"),
                      (lambda: create_model("gpt", 256, (1, 8, 8)), "reads sequences of token ids"),
                      (lambda: create_model("gpt", 256, (16,), dim=30, heads=4), "not divisible by heads"),
                      (lambda: create_model("gpt", 256, (16,), blocks=5, depth=4), "allows 1..4 blocks")):
        with pytest.raises(BpfreeError, match=said):
            bad()


def test_attention_is_causal_in_gpt():
    torch.manual_seed(0)
    lm = create_model("gpt", 256, (16,), blocks=1, **GPT).eval()
    x = torch.randint(0, 256, (2, 16))
    changed = x.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        a, b = lm(x), lm(changed)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.equal(a[:, 10:], b[:, 10:])


def test_text_is_split_by_position_and_batched_as_next_token_windows(corpus):
    data = load_data(f"text:{corpus}", context=32, batch_size=8, seed=0)
    size = corpus.stat().st_size
    train_tokens = data.loaders.train.tokens
    assert len(train_tokens) == round(0.9 * size) and data.in_shape == (32,) and data.num_classes == 256
    x, y = next(iter(data.loaders.train))
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    assert len(data.loaders.train) == len(train_tokens) // (8 * 32)
    test = torch.frombuffer(bytearray(corpus.read_bytes()), dtype=torch.uint8)[round(0.95 * size):]
    xs, ys = zip(*data.loaders.test)
    assert torch.equal(torch.cat(xs).flatten(), test[: len(torch.cat(xs).flatten())].long())   # in order
    with pytest.raises(BpfreeError, match="--train-subset does not apply to text data"):
        load_data(f"text:{corpus}", train_subset=100)
    with pytest.raises(BpfreeError, match="fewer than one window of --context 4096"):
        load_data(f"text:{corpus}", context=4096)
    with pytest.raises(BpfreeError, match="no such file"):
        load_data(f"text:{corpus}.missing")


@pytest.mark.parametrize("model", ["vit", "gpt"])
@pytest.mark.parametrize("method", sorted(list_rules()))
def test_every_applicable_rule_learns_and_resumes_exactly_the_others_refuse(model, method, corpus, tmp_path):
    cfg = config(model, method, corpus)
    if method not in APPLIES[model]:
        with pytest.raises(BpfreeError, match=f"method {method} does not apply to "):
            train(cfg, tmp_path / "refused", quiet=True)
        assert not (tmp_path / "refused").exists()
        return
    whole = train(cfg, tmp_path / "whole", quiet=True)
    assert train(cfg, tmp_path / "cut", quiet=True, stop_after=1) == {}
    resumed = train(cfg, tmp_path / "cut", quiet=True, resume=True)
    drop = ("time", "per_s", "git_commit")
    assert {k: v for k, v in resumed.items() if not any(d in k for d in drop)} == \
           {k: v for k, v in whole.items() if not any(d in k for d in drop)}
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    if model == "gpt":       # nats per byte: uniform guessing is ln 256 = 5.55
        assert whole["test_loss"] < 4.6 and whole["test_bits_per_byte"] == pytest.approx(whole["test_loss"] / math.log(2))
    else:
        assert whole["test_accuracy"] > 0.4 and whole["test_loss"] < math.log(10)
    assert rows[-1]["test_loss"] == whole["test_loss"] and "val_loss" in rows[-1] or model == "vit"


def test_a_language_model_pipelines_token_messages_across_ranks_and_trains_in_bf16(corpus, tmp_path):
    cfg = config("gpt", "dgl", corpus, epochs=1)
    one = train(cfg, tmp_path / "one", quiet=True)
    two = train(cfg, tmp_path / "two", quiet=True, parallel=2)
    assert two["test_loss"] == one["test_loss"] and two["stages"] == one["stages"]
    assert two["parallel"]["ranks"][0]["message_bytes"] > 32 * 32 * 32 * 4      # B x T x D float32 tokens
    bf16 = train(config("gpt", "dgl", corpus, epochs=1, precision="bf16"), tmp_path / "bf16", quiet=True)
    assert bf16["test_loss"] < 5.0


def test_the_cli_trains_a_gpt_on_a_text_file(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "gpt", "--data", f"text:{corpus}", "--context", "32", "--batch-size", "32",
                 "--model-opt", "dim=32", "--method", "bwbpf", "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["context"] == 32 and config["text_split"] == [0.9, 0.05, 0.05]
    assert main(["train", "--model", "gpt", "--data", f"text:{corpus}", "--method", "predsim", "--quiet",
                 "--out", str(tmp_path / "x")]) == 2
    assert "method predsim does not apply to a language model" in capsys.readouterr().err
    assert main(["train", "--model", "gpt", "--data", f"text:{corpus}", "--method", "infopro", "--aux-loss",
                 "contrast", "--quiet", "--out", str(tmp_path / "x")]) == 2
    assert "use --aux-loss ce" in capsys.readouterr().err


def test_infopro_reconstructs_a_vits_image_from_its_patch_tokens_and_a_gpts_input_tokens():
    from torch import nn
    from torch.nn import functional as F

    from bpfree.rules.infopro import TokenDecoder, patch_size

    assert patch_size(5, (1, 8, 8)) == (4, 1) and patch_size(16, (3, 8, 8)) == (2, 0)
    with pytest.raises(BpfreeError, match="7 tokens are not the patches of a 8x8 image"):
        patch_size(7, (1, 8, 8))
    x = torch.randn(3, 2, 8, 8)
    patches = F.unfold(x, 4, stride=4).transpose(1, 2)                  # (B, 4, C·p·p), row-major patches
    decoder = TokenDecoder((5, 32), (2, 8, 8), vocab=10)
    decoder.net = nn.Identity()                                          # tokens that *are* the patches
    tokens = torch.cat([torch.full((3, 1, 32), 7.0), patches], 1)       # a class token first, then them
    assert decoder.loss(tokens, x) == 0 and decoder.loss(tokens.flip(1), x) > 0.5
    ids = torch.randint(0, 256, (3, 16))
    lm = TokenDecoder((16, 32), (16,), vocab=256)
    lm.net = nn.Identity()
    perfect = F.one_hot(ids, 256).float() * 50
    assert lm.loss(perfect, ids) < 1e-6 and lm.loss(perfect.roll(1, 1), ids) > 10
