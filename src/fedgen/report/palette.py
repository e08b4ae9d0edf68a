"""A model's colour/intensity palette: k-means over the pixels of its samples (the paper's Fig. 4/5)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from sklearn.cluster import KMeans


def palette(images: np.ndarray, k: int = 6, *, seed: int = 0, max_pixels: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """Cluster centres (k, C) as uint8 and their pixel shares (k,), sorted by share, from uint8 (N, H, W, C)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"palette expects uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64)
    rng = np.random.default_rng(seed)
    if len(pixels) > max_pixels:
        pixels = pixels[rng.choice(len(pixels), max_pixels, replace=False)]
    k = min(k, len(np.unique(pixels, axis=0)))
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(pixels)
    shares = np.bincount(km.labels_, minlength=k) / len(pixels)
    order = np.argsort(-shares, kind="stable")
    return km.cluster_centers_[order].round().clip(0, 255).astype(np.uint8), shares[order]


def palette_strip(colors: np.ndarray, shares: np.ndarray, width: int, height: int = 28) -> Image.Image:
    """A horizontal bar: one block per cluster, as wide as its share, labelled with the share in percent."""
    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    x = 0.0
    for color, share in zip(colors, shares, strict=True):
        rgb = tuple(int(v) for v in (np.repeat(color, 3) if len(color) == 1 else color))
        x1 = x + share * width
        draw.rectangle([int(x), 0, max(int(x), int(x1) - 1), height - 1], fill=rgb)
        if share > 0.06:
            text = "black" if sum(rgb) > 380 else "white"
            draw.text((int(x) + 3, height // 2 - 5), f"{share:.0%}", fill=text)
        x = x1
    return strip
