"""Training-batch augmentation on the batch's device: random crop, horizontal flip, cutout.

    aug = Augment.parse("crop=4,flip,cutout=8")      # any subset, any order ("+" also separates); "": nothing
    x = data.normalize(aug(x_uint8_batch, generator))

A few tensor operations for the whole batch (no per-image Python, no host round trip), as airbench
and hlb-CIFAR10 write them; torchvision's compiled ops do not load against our CPU torch build.
Random numbers come from the `torch.Generator` passed in (the run's own, so the same seed gives the
same run, and saving / restoring its state keeps `--resume` bit-identical), drawn on the
generator's device in a fixed order (crop rows, crop columns, flips, cutout rows, cutout columns),
one value per image each: how much is drawn depends only on the batch size.

* `crop=P`: pad P zero pixels on every side, take a random window of the original size (offsets
  uniform in 0..2P per axis, each image its own).
* `flip`: mirror left-right with probability 1/2 per image.
* `cutout=S`: zero one S x S square per image, placed uniformly *inside* the image (S*S pixels
  always, every channel), as hlb-CIFAR10 does; DeVries & Taylor's cutout centres the square
  anywhere and clips it at the border, removing less on average.

Apply it to the stored batch *before* normalising (the uint8 bytes for image datasets): zero is then
black, exactly torchvision's `RandomCrop(32, padding=4)` before `Normalize`, the recipe the
papers' CIFAR / Tiny-ImageNet code uses, and the gather moves 1 byte per value instead of 4. (Padding
the normalised batch with zeros would pad with the mean colour instead, as airbench does; DeVries's
cutout, applied after `Normalize`, also zeroes to the mean: ours zeroes to black.) On a float
dataset normalised at load (digits, float npz) zero is the mean: there is no byte form to pad.
The crop indexes each image's window in an unfolded view of the padded batch (one gather), the flip
and cutout are `torch.where` selections; the output keeps the input's dtype, shape and memory format
(NCHW or channels-last). The input is never modified.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import BpfreeError

SYNTAX = ("a comma-separated subset of crop=P, flip, cutout=S (P, S: pixels, whole numbers >= 1), "
          "e.g. crop=4,flip (or crop=4+flip, e.g. inside a compare entry)")


@dataclass(frozen=True)
class Augment:
    """Which augmentations to apply (all off by default); `Augment.parse(text)`, `str()` gives it back."""
    crop: int = 0        # padding P in pixels; 0 = no random crop
    flip: bool = False
    cutout: int = 0      # square side S in pixels; 0 = no cutout

    @classmethod
    def parse(cls, text: str | None) -> "Augment":
        """From "crop=4,flip,cutout=8" (any subset, any order); "" / "none" / None: no augmentation."""
        if text is None or text.strip().lower() in ("", "none"):
            return cls()
        values: dict = {}
        for part in (p.strip() for p in text.replace("+", ",").split(",")):   # "+" too: compare entries
            name, eq, value = (t.strip() for t in part.partition("="))
            if name == "flip" and not eq:
                parsed = True
            elif name in ("crop", "cutout") and value.isascii() and value.isdigit() and int(value) >= 1:
                parsed = int(value)
            else:
                why = (f"{name} takes no value" if name == "flip"
                       else f"{name} needs a whole number of pixels >= 1 ({name}=N)" if name in ("crop", "cutout")
                       else f"unknown part {part!r}")
                raise BpfreeError(f"bad --augment {text!r}: {why}; expected {SYNTAX}")
            if name in values:
                raise BpfreeError(f"bad --augment {text!r}: {name} given twice; expected {SYNTAX}")
            values[name] = parsed
        return cls(**values)

    def __str__(self) -> str:
        parts = ([f"crop={self.crop}"] if self.crop else []) + (["flip"] if self.flip else []) \
            + ([f"cutout={self.cutout}"] if self.cutout else [])
        return ",".join(parts) or "none"

    def __bool__(self) -> bool:
        return bool(self.crop or self.flip or self.cutout)

    def check(self, in_shape: tuple[int, ...]) -> None:
        """Refuse, before training, inputs this augmentation cannot apply to: one line naming why."""
        if not self:
            return
        if len(in_shape) != 3:
            raise BpfreeError(f"--augment {self} needs image inputs (C, H, W); the data has shape {tuple(in_shape)}")
        side = min(in_shape[1:])
        if self.cutout > side:
            raise BpfreeError(f"--augment cutout={self.cutout} is larger than the {in_shape[1]}x{in_shape[2]} images; "
                              f"use cutout=1..{side}")
        if self.crop >= side:
            raise BpfreeError(f"--augment crop={self.crop} pads more than the {in_shape[1]}x{in_shape[2]} images' side: "
                              f"a crop could hold no image pixel at all; use crop=1..{side - 1}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The batch `x` (B, C, H, W), augmented with random numbers from `generator`."""
        if not self:
            return x
        if x.dim() != 4:
            raise BpfreeError(f"--augment {self} needs a batch of images (B, C, H, W); got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()

        def draw(high: int) -> torch.Tensor:       # one integer in [0, high) per image, on x's device
            return torch.randint(high, (b,), generator=generator, device=generator.device).to(x.device)

        out = x
        if self.crop:
            p = self.crop
            dy, dx = draw(2 * p + 1), draw(2 * p + 1)
            windows = F.pad(x, (p, p, p, p)).unfold(2, h, 1).unfold(3, w, 1)    # (B, C, 2P+1, 2P+1, H, W) view
            out = windows[torch.arange(b, device=x.device), :, dy, dx]         # each image its own window
        if self.flip:
            flipped = draw(2).bool()[:, None, None, None]
            out = torch.where(flipped, out.flip(3), out)
        if self.cutout:
            s = self.cutout
            y0, x0 = draw(h - s + 1), draw(w - s + 1)
            dr = torch.arange(h, device=x.device) - y0[:, None]                 # (B, H) row - square's top
            dc = torch.arange(w, device=x.device) - x0[:, None]
            square = (((dr >= 0) & (dr < s))[:, None, :, None]) & (((dc >= 0) & (dc < s))[:, None, None, :])
            out = torch.where(square, 0, out)                                   # (B, 1, H, W) over the channels
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
