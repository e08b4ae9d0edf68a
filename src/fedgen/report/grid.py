"""Sample grids: one row per class, labelled (the paper's figures draw one class per row)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fedgen.core.progress import task
from fedgen.data.transforms import to_uint8
from fedgen.report.palette import palette, palette_strip


def save_grid(images: np.ndarray, labels: np.ndarray, classes: list[str], path: Path, *,
              cell: int | None = None, pad: int = 2, header: Image.Image | None = None) -> None:
    """Write uint8 images (N, H, W, C) as a grid with one labelled row per class present in `labels`.

    Images are upscaled (nearest) to at least 56 px so small datasets stay readable. `header`, if given,
    is drawn above the grid.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"save_grid expects uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    h, w, c = images.shape[1:]
    scale = max(1, -(-56 // h)) if cell is None else max(1, cell // h)
    ch, cw = h * scale, w * scale
    rows = [k for k in range(len(classes)) if (labels == k).any()]
    ncol = max(int((labels == k).sum()) for k in rows)
    label_w = 110
    font = ImageFont.load_default()
    head_h = header.height + pad if header is not None else 0
    canvas = Image.new("RGB", (label_w + ncol * (cw + pad) + pad, head_h + len(rows) * (ch + pad) + pad), "white")
    if header is not None:
        canvas.paste(header, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for r, k in enumerate(rows):
        y = head_h + pad + r * (ch + pad)
        draw.text((4, y + ch // 2 - 5), classes[k][:16], fill="black", font=font)
        for col, img in enumerate(images[labels == k]):
            tile = Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB")
            tile = tile.resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + col * (cw + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def grid_labels(num_classes: int, per_class: int) -> np.ndarray:
    """[0]*per_class + [1]*per_class + ...: one grid row per class."""
    return np.repeat(np.arange(num_classes), per_class)


def sample_grid(sampler, classes: list[str], per_class: int, path: Path, *, seed: int = 0,
                with_palette: bool = False, progress=None) -> None:
    """Draw `per_class` images of every class from a labelled sampler (diffusion/pipeline.py) and write them as a
    grid, optionally with the k-means palette of the samples' pixels drawn above it (the paper's Fig. 4/5 for
    personalised models)."""
    labels = grid_labels(len(classes), per_class)
    total = len(labels) * sampler.evaluations_per_image
    with task(progress, f"sampling {len(labels)} (grid)", total) as advance:
        x = sampler.images(torch.from_numpy(labels), seed, progress=advance)
    images = to_uint8(x)
    header = None
    if with_palette:
        colors, shares = palette(images, seed=seed)
        side = max(1, -(-56 // images.shape[1])) * images.shape[2]
        header = palette_strip(colors, shares, width=per_class * (side + 2))
    save_grid(images, labels, classes, path, header=header)
