"""Transformers as unit lists: a Vision Transformer (`vit`) and a GPT-style language model (`gpt`).

    vit:  x (C, H, W) -> patches (conv p x p, stride p) -> [class token] + position embedding
          -> depth x pre-norm block -> LayerNorm -> class token (or mean of tokens) -> Linear
    gpt:  tokens (T,) -> token + position embedding -> depth x causal pre-norm block
          -> LayerNorm -> Linear to the vocabulary, at every position (next-token scores (T, V))
    block: x = x + Attention(LN(x));  x = x + MLP(LN(x))       MLP = Linear(D, rD), GELU, Linear(rD, D)

Each transformer block is a unit (the embedding belongs to block 1), so K goes up to the depth and
every message between blocks is a (B, T, D) token sequence. Attention is
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels where the device
has them). No dropout: the comparisons here are of learning rules, not regularisers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BpfreeError
from .blocknet import register_model, require_image


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Pre-norm: x + Attention(LN(x)), then + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, causal: bool):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, [1 +] HW/p^2, D): patches by a strided conv, [class token], positions."""

    def __init__(self, channels: int, side: tuple[int, int], patch: int, dim: int, cls_token: bool):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)
        tokens = (side[0] // patch) * (side[1] // patch) + cls_token
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1)
        return x + self.pos


class TokenEmbed(nn.Module):
    """(B, T) token ids -> (B, T, D): token + learned position embedding."""

    def __init__(self, vocab: int, context: int, dim: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.long()              # ids arrive as integers (a shape probe may send zeros of another dtype)
        return self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))


class Pool(nn.Module):
    """(B, T, D) -> (B, D): the class token (first) or the mean of the tokens."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.how == "cls" else x.mean(1)


def _check(model: str, dim: int, depth: int, heads: int, mlp_ratio: int) -> None:
    for name, value in (("dim", dim), ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BpfreeError(f"model {model} option {name} must be a positive integer, got {value!r}")
    if dim % heads:
        raise BpfreeError(f"model {model}: dim {dim} is not divisible by heads {heads}")


@register_model("vit", "Vision Transformer: patch embedding, pre-norm blocks (options patch=4, dim=64, depth=6, "
                       "heads=4, mlp_ratio=4, pool=cls|mean), one unit per block")
def vit(num_classes, in_shape, patch=4, dim=64, depth=6, heads=4, mlp_ratio=4, pool="cls"):
    require_image("vit", in_shape)
    _check("vit", dim, depth, heads, mlp_ratio)
    c, h, w = in_shape
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or h % patch or w % patch:
        raise BpfreeError(f"model vit option patch must divide the image side ({h}x{w}), got {patch!r}")
    if pool not in ("cls", "mean"):
        raise BpfreeError(f"model vit option pool must be cls or mean, got {pool!r}")
    blocks = [TransformerBlock(dim, heads, mlp_ratio, causal=False) for _ in range(depth)]
    units = [nn.Sequential(PatchEmbed(c, (h, w), patch, dim, pool == "cls"), blocks[0]), *blocks[1:]]
    return units, nn.Sequential(nn.LayerNorm(dim), Pool(pool), nn.Linear(dim, num_classes))


@register_model("gpt", "GPT-style causal language model on (T,) token ids: token + position embedding, pre-norm "
                       "causal blocks, LayerNorm + LM head at every position (options dim=128, depth=4, "
                       "heads=4, mlp_ratio=4; classes = vocabulary, 256 for bytes), one unit per block")
def gpt(num_classes, in_shape, dim=128, depth=4, heads=4, mlp_ratio=4):
    if len(in_shape) != 1:
        raise BpfreeError(f"model gpt reads sequences of token ids (T,); data has shape {tuple(in_shape)} "
                          "(use --data text:PATH)")
    _check("gpt", dim, depth, heads, mlp_ratio)
    blocks = [TransformerBlock(dim, heads, mlp_ratio, causal=True) for _ in range(depth)]
    units = [nn.Sequential(TokenEmbed(num_classes, in_shape[0], dim), blocks[0]), *blocks[1:]]
    return units, nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
