"""Privacy audits: measured leakage of a trained model, for any run (docs/DESIGN.md, Privacy).

- White-box loss-threshold membership inference (diffusion runs): a training image tends to have a lower DDPM
  loss than an unseen one. The loss at each timestep of a grid is the score; the timestep is chosen on a
  calibration half of the targets and the attack is scored on the other half, so the reported AUC is not
  inflated by the choice.
- Black-box distance attack (any generator, PGA included): the distance from a target to the nearest of n
  generated images of its class.
- Memorisation (Carlini et al. 2023): for each generated image, the distance to its nearest training image over
  the mean distance to its 50 nearest; a ratio far below 1 is a near-copy of one training image.
- For a DP run: every (TPR, FPR) an attack reaches must satisfy TPR <= e^eps FPR + delta. The empirical lower
  bound on epsilon it implies uses Clopper-Pearson bounds on TPR and FPR (Jagielski et al. 2020).

Members are training images of the run's silos; non-members are images of the same distribution no silo trained
on (the rest of the training split where the run used a subset, else the test split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy.stats import beta as beta_dist
from scipy.stats import rankdata

from fedgen.core.seeding import generator
from fedgen.data.transforms import to_uint8


@dataclass
class Targets:
    """Audit targets: images in [-1, 1] with labels; `member` marks training images."""

    images: torch.Tensor
    labels: torch.Tensor
    member: np.ndarray  # bool


# -- scoring ---------------------------------------------------------------------------------------------------
def roc_points(member_scores: np.ndarray, other_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TPR, FPR) at every threshold "score >= s means member", from the highest s down."""
    scores = np.concatenate([member_scores, other_scores])
    is_member = np.concatenate([np.ones(len(member_scores)), np.zeros(len(other_scores))])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]  # the last index of each distinct score
    tp, fp = np.cumsum(is_member)[last], np.cumsum(1 - is_member)[last]
    return np.r_[0, tp / len(member_scores)], np.r_[0, fp / len(other_scores)]


def auc(member_scores: np.ndarray, other_scores: np.ndarray) -> float:
    """P(member score > non-member score) + P(tie)/2 (the Mann-Whitney statistic)."""
    ranks = rankdata(np.concatenate([member_scores, other_scores]))
    m, n = len(member_scores), len(other_scores)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def tpr_at_fpr(member_scores: np.ndarray, other_scores: np.ndarray, fpr: float) -> float:
    """The highest TPR of a threshold whose FPR is at most `fpr`."""
    tprs, fprs = roc_points(member_scores, other_scores)
    return float(tprs[fprs <= fpr].max())


def attack_stats(member_scores: np.ndarray, other_scores: np.ndarray) -> dict:
    return {"auc": auc(member_scores, other_scores),
            "tpr_at_1pct_fpr": tpr_at_fpr(member_scores, other_scores, 0.01),
            "tpr_at_0.1pct_fpr": tpr_at_fpr(member_scores, other_scores, 0.001)}


def bootstrap_intervals(member_scores: np.ndarray, other_scores: np.ndarray, reps: int = 200,
                        seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals of `attack_stats`, resampling members and non-members separately."""
    rng = np.random.default_rng(seed)
    draws = [attack_stats(rng.choice(member_scores, len(member_scores)), rng.choice(other_scores, len(other_scores)))
             for _ in range(reps)]
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {f"{k}_ci": [float(np.percentile([d[k] for d in draws], lo)),
                        float(np.percentile([d[k] for d in draws], hi))] for k in draws[0]}


def auc_null_sd(m: int, n: int) -> float:
    """Standard deviation of the AUC of a score that does not depend on membership (no ties)."""
    return math.sqrt((m + n + 1) / (12 * m * n))


# -- the DP check ------------------------------------------------------------------------------------------------
def clopper_pearson(k: np.ndarray, n: int, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    a = (1 - level) / 2
    lo = np.where(k > 0, beta_dist.ppf(a, k, n - k + 1), 0.0)
    hi = np.where(k < n, beta_dist.ppf(1 - a, k + 1, n - k), 1.0)
    return lo, hi


def _epsilon_from(tpr: np.ndarray, fpr: np.ndarray, delta: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(np.maximum(tpr - delta, 0) / fpr)
        two = np.log(np.maximum(1 - fpr - delta, 0) / (1 - tpr))
    vals = np.concatenate([one[np.isfinite(one)], two[np.isfinite(two)]])
    return float(max(vals.max(initial=0.0), 0.0))


def epsilon_lower_bound(member_scores: np.ndarray, other_scores: np.ndarray, delta: float,
                        level: float = 0.95) -> dict:
    """The largest epsilon an attack's thresholds prove: the max over thresholds of log((TPR - delta) / FPR) and
    log((1 - FPR - delta) / (1 - TPR)) (both directions of the DP inequality), from the empirical rates and, at
    `level` confidence, from Clopper-Pearson bounds (TPR from below, FPR from above)."""
    tprs, fprs = roc_points(member_scores, other_scores)
    m, n = len(member_scores), len(other_scores)
    tpr_lo, _ = clopper_pearson(np.round(tprs * m), m, level)
    _, fpr_hi = clopper_pearson(np.round(fprs * n), n, level)
    return {"epsilon_lower_bound": _epsilon_from(tprs, fprs, delta),
            f"epsilon_lower_bound_{int(level * 100)}": _epsilon_from(tpr_lo, fpr_hi, delta)}


def dp_check(member_scores: np.ndarray, other_scores: np.ndarray, epsilon: float, delta: float) -> dict:
    """Does the attack respect TPR <= e^eps FPR + delta (no threshold violates it with 95% confidence)?"""
    lb = epsilon_lower_bound(member_scores, other_scores, delta)
    return lb | {"respects_dp_bound": lb["epsilon_lower_bound_95"] <= epsilon}


# -- the attacks -------------------------------------------------------------------------------------------------
def timestep_grid(timesteps: int, points: int) -> list[int]:
    """`points` timesteps spread over [0, T): the centres of equal bins."""
    return sorted({min(timesteps - 1, int((i + 0.5) * timesteps / points)) for i in range(points)})


@torch.no_grad()
def loss_scores(model, scheduler, targets: Targets, timesteps: list[int], draws: int, seed: int,
                batch_size: int = 256, progress=None) -> np.ndarray:
    """-(DDPM loss) of every target at every timestep, averaged over `draws` noise draws: (len(t), n)."""
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(timesteps), len(targets.labels)))
    for i, t in enumerate(timesteps):
        gen = generator(seed, "audit-loss", t)  # the same noise for every target: only the image differs
        for _ in range(draws):
            for chunk in torch.arange(len(targets.labels)).split(batch_size):
                x0 = targets.images[chunk].to(device)
                noise = torch.randn(x0.shape, generator=gen).to(device)
                tt = torch.full((len(chunk),), t, device=device, dtype=torch.long)
                pred = model(scheduler.add_noise(x0, noise, tt), tt, class_labels=targets.labels[chunk].to(device))
                out[i, chunk.numpy()] -= ((pred.sample.float() - noise) ** 2).flatten(1).mean(1).cpu().numpy() / draws
                if progress is not None:
                    progress(len(chunk))
    return out


def loss_attack(scores: np.ndarray, member: np.ndarray, timesteps: list[int], seed: int) -> dict:
    """Pick the timestep with the best AUC on a random calibration half; score the attack on the other half."""
    rng = np.random.default_rng(seed)
    calib = np.zeros(len(member), bool)
    for group in (np.nonzero(member)[0], np.nonzero(~member)[0]):
        calib[rng.permutation(group)[: len(group) // 2]] = True
    aucs = [auc(s[calib & member], s[calib & ~member]) for s in scores]
    best = int(np.argmax(aucs))
    s, held = scores[best], ~calib
    by_timestep = dict(zip(map(str, timesteps), aucs, strict=True))
    return {"timestep": timesteps[best], "calibration_auc_by_timestep": by_timestep,
            "members": s[held & member], "others": s[held & ~member]}


def nearest_distances(queries: torch.Tensor, query_labels: torch.Tensor, pool: torch.Tensor,
                      pool_labels: torch.Tensor, k: int = 1, same_class: bool = True) -> torch.Tensor:
    """L2 distances (pixels in [-1, 1]) from each query to its k nearest in `pool` (of its class): (n, k)."""
    q, p = queries.flatten(1).double(), pool.flatten(1).double()
    out = torch.empty(len(q), k, dtype=torch.float64)
    groups = query_labels.unique() if same_class else [None]
    for label in groups:
        qi = torch.nonzero(query_labels == label).flatten() if same_class else torch.arange(len(q))
        pi = torch.nonzero(pool_labels == label).flatten() if same_class else torch.arange(len(p))
        if len(pi) < k:
            raise ValueError(f"class {int(label)} has {len(pi)} images in the pool, fewer than k={k}")
        for chunk in qi.split(1024):
            d = torch.cdist(q[chunk], p[pi])
            out[chunk] = d.topk(k, dim=1, largest=False).values
    return out


def distance_scores(targets: Targets, generated: torch.Tensor, generated_labels: torch.Tensor) -> np.ndarray:
    """-(distance to the nearest generated image of the target's class)."""
    return -nearest_distances(targets.images, targets.labels, generated, generated_labels)[:, 0].numpy()


def memorisation(generated: torch.Tensor, train: torch.Tensor, k: int = 50, copy_ratio: float = 1 / 3) -> dict:
    """Nearest-neighbour ratios of generated images against the training images (any class)."""
    q, p = generated.flatten(1).double(), train.flatten(1).double()
    k = min(k, len(p))
    dists, nearest = [], []
    for chunk in torch.arange(len(q)).split(512):
        d = torch.cdist(q[chunk], p).topk(k, dim=1, largest=False)
        dists.append(d.values)
        nearest.append(d.indices[:, 0])
    d, idx = torch.cat(dists), torch.cat(nearest)
    ratio = (d[:, 0] / d.mean(1)).numpy()
    return {"ratio": ratio, "nearest": idx.numpy(), "nearest_distance": d[:, 0].numpy(), "k": k,
            "copy_ratio": copy_ratio}


def pairs_image(generated: torch.Tensor, train: torch.Tensor, ratio: np.ndarray, nearest: np.ndarray, path,
                count: int = 16, distance: np.ndarray | None = None, copy_ratio: float | None = None) -> list[int]:
    """A PNG of the `count` generated images closest to a training image (lowest ratio), each above its nearest
    training image, labelled: the rows ("generated", "training: its nearest"), and under each pair its distance
    `d` (L2 in pixels scaled to [-1, 1]) and ratio `r` (nearest / mean of the k nearest; below `copy_ratio`, drawn
    red, a near copy). Returns the generated indices shown."""
    order = np.argsort(ratio, kind="stable")[:count]
    top, bottom = to_uint8(generated[order]), to_uint8(train[nearest[order]])
    h, w, c = top.shape[1:]
    scale = max(1, 56 // h)
    tw, th = max(w * scale, 56), h * scale
    label_w, text_h, pad = 120, 26, 2
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (label_w + len(order) * (tw + pad) + pad, 2 * (th + pad) + text_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, pad + th // 2 - 5), "generated", fill="black", font=font)
    draw.text((4, 2 * pad + th + th // 2 - 11), "training image:", fill="black", font=font)
    draw.text((4, 2 * pad + th + th // 2 + 1), "its nearest", fill="black", font=font)
    draw.text((4, 2 * (th + pad) + 2), "d: distance", fill="black", font=font)
    draw.text((4, 2 * (th + pad) + 13), "r: ratio", fill="black", font=font)
    for col, i in enumerate(order):
        x = label_w + pad + col * (tw + pad)
        for row, img in enumerate((top[col], bottom[col])):
            tile = Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB").resize((w * scale, th),
                                                                                       Image.NEAREST)
            canvas.paste(tile, (x, pad + row * (th + pad)))
        near_copy = copy_ratio is not None and ratio[i] < copy_ratio
        colour = (200, 0, 0) if near_copy else (0, 0, 0)
        if distance is not None:
            draw.text((x, 2 * (th + pad) + 2), f"d {distance[i]:.2f}", fill=colour, font=font)
        draw.text((x, 2 * (th + pad) + 13), f"r {ratio[i]:.2f}", fill=colour, font=font)
    canvas.save(path)
    return order.tolist()


def roc_curve(member_scores: np.ndarray, other_scores: np.ndarray, points: int = 201) -> dict:
    """The attack's ROC for plotting: FPR and TPR lists (at most `points` of them, rounded to 4 decimals)."""
    tprs, fprs = roc_points(member_scores, other_scores)
    if len(tprs) > points:
        keep = np.unique(np.r_[np.linspace(0, len(tprs) - 1, points).round().astype(int), len(tprs) - 1])
        tprs, fprs = tprs[keep], fprs[keep]
    return {"fpr": [round(float(v), 4) for v in fprs], "tpr": [round(float(v), 4) for v in tprs]}


ATTACKS = {"mia_loss": "loss-threshold membership attack (white-box)",
           "mia_distance": "nearest-sample distance membership attack (black-box)"}


def verdict(record: dict) -> list[str]:
    """An audit record in plain words: per attack, whether it tells members from non-members better than chance
    (its AUC's 95% interval above 0.5), whether it stays within the ledger's epsilon (DP runs), and whether the
    generated images copy training images. The first line is the overall verdict."""
    lines, leaks, breaks = [], [], []
    for prefix, name in ATTACKS.items():
        if f"{prefix}_auc" not in record:
            continue
        auc_, (lo, hi) = record[f"{prefix}_auc"], record[f"{prefix}_auc_ci"]
        if lo > 0.5:
            what = "tells members from non-members better than chance"
            leaks.append(name)
        else:
            what = "does no better than chance (its interval contains 0.5)" if hi >= 0.5 else \
                "scores below chance (no evidence of leakage)"
        line = f"{name}: AUC {auc_:.3f} (95% interval {lo:.3f}-{hi:.3f}), {what}"
        if f"{prefix}_respects_dp_bound" in record:
            bound = record[f"{prefix}_epsilon_lower_bound_95"]
            if record[f"{prefix}_respects_dp_bound"]:
                line += f"; the ε it proves (95%: {bound:.3g}) is within the ledger's ε = {record['dp_epsilon']:.3g}"
            else:
                line += (f"; it proves ε ≥ {bound:.3g} with 95% confidence, MORE than the ledger's "
                         f"ε = {record['dp_epsilon']:.3g}: the guarantee does not hold as implemented")
                breaks.append(name)
        lines.append(line)
    if "memorisation_near_copies" in record:
        copies = record["memorisation_near_copies"]
        lines.append(f"memorisation: {copies} of {record['generated']} generated images "
                     f"{'is a near copy' if copies == 1 else 'are near copies'} of a training image (distance to the "
                     f"nearest below {record['memorisation_copy_ratio']:.2g} of the mean to the "
                     f"{record['memorisation_neighbours']} nearest); median ratio "
                     f"{record['memorisation_ratio_median']:.2f} (1 = no closer to one image than to the others)")
    if breaks:
        head = f"FAIL: {' and '.join(breaks)} exceeded the DP guarantee"
    elif leaks or record.get("memorisation_near_copies", 0):
        found = leaks + (["near copies of training images"] if record.get("memorisation_near_copies") else [])
        head = f"LEAKAGE MEASURED: {'; '.join(found)}"
    else:
        head = "no leakage measured: no attack did better than chance and no generated image copies a training image"
    return [head + " (an audit can show leakage, never prove its absence)", *lines]
