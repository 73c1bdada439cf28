"""The poster's pictures: mask distribution per layer, t-SNE of clean vs poisoned features."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (parent folders made) and close it."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_mask_distribution(masks: Dict[str, torch.Tensor], path: str | Path, lower: Optional[Sequence[float]] = None,
                           title: str = "NFT masks per layer") -> Path:
    """Box plot of mask values per masked layer (input -> output), with mu(l) as a line."""
    plt = _plt()
    names = list(masks)
    data = [masks[n].float().flatten().numpy() for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4))
    ax.boxplot(data, showfliers=True, flierprops={"markersize": 2})
    if lower is not None:
        ax.plot(range(1, len(lower) + 1), lower, "r--", lw=1, label="lower bound mu(l)")
        ax.legend(loc="lower left")
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(names, rotation=75, fontsize=7)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("mask value")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_trace(rows: List[Dict[str, object]], path: str | Path, title: str = "NFT trajectory") -> Path:
    """ACC and ASR (and clean-split accuracy) against NFT steps; interpolated masks as a second panel."""
    plt = _plt()
    steps = [r for r in rows if r.get("phase") != "interpolated"]
    interp = [r for r in rows if r.get("phase") == "interpolated"]
    fig, axes = plt.subplots(1, 2 if interp else 1, figsize=(10 if interp else 6, 4), squeeze=False)
    ax = axes[0][0]
    xs = [r["step"] for r in steps]
    for key, style in (("acc", "b-o"), ("asr", "r-o"), ("clean_split_acc", "g--")):
        if steps and key in steps[0]:
            ax.plot(xs, [r[key] for r in steps], style, ms=3, label=key)
    main_end = max((r["step"] for r in steps if r.get("phase") == "main"), default=None)
    if main_end is not None and any(r.get("phase") == "recovery" for r in steps):
        ax.axvline(main_end, color="k", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="center right", fontsize=8)
    if interp:
        ax2 = axes[0][1]
        interp = sorted(interp + steps[-1:], key=lambda r: r["t"])  # the last step is t = 1
        ts = [r["t"] for r in interp]
        ax2.plot(ts, [r["acc"] for r in interp], "b-o", ms=3, label="acc")
        ax2.plot(ts, [r["asr"] for r in interp], "r-o", ms=3, label="asr")
        ax2.set_xlabel("t (masks 1 - t(1 - m))")
        ax2.set_ylim(-2, 102)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_tsne(panels: List[Dict[str, np.ndarray]], path: str | Path, seed: int = 0) -> Path:
    """One t-SNE panel per model: ``{"title", "features", "labels", "poisoned"}``; poisoned shown as crosses."""
    from sklearn.manifold import TSNE

    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
    for ax, p in zip(axes[0], panels):
        feats = np.asarray(p["features"], dtype=np.float32)
        emb = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, max(5, len(feats) // 10))).fit_transform(feats)
        lab, poi = np.asarray(p["labels"]), np.asarray(p["poisoned"]).astype(bool)
        sc = ax.scatter(emb[~poi, 0], emb[~poi, 1], c=lab[~poi], cmap="tab10", s=6, alpha=0.7, vmin=0, vmax=9)
        ax.scatter(emb[poi, 0], emb[poi, 1], c="black", marker="x", s=10, lw=0.6, label="triggered")
        ax.set_title(p["title"], fontsize=10)
        ax.set_xticks([]); ax.set_yticks([])
        ax.legend(loc="lower right", fontsize=7)
    fig.colorbar(sc, ax=axes[0].tolist(), shrink=0.8, label="true class")
    return save_figure(fig, path)


@torch.no_grad()
def collect_features(adapter, model: torch.nn.Module, test, attack, n: int = 600, device: torch.device = torch.device("cpu"),
                     seed: int = 0) -> Dict[str, np.ndarray]:
    """Penultimate features of ``n`` clean test samples and of their triggered copies (non-target)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(test), generator=g)[:n]
    batch = adapter.collate(test.__getitems__(idx.tolist())) if hasattr(test, "__getitems__") else \
        adapter.collate([test[i] for i in idx.tolist()])
    x, y = adapter.to_device(batch[0], device), batch[1].to(device)
    model.eval()
    feats, labels, poisoned = [adapter.features(model, x)], [y], [torch.zeros_like(y, dtype=torch.bool)]
    if attack is not None:
        sel = attack.eval_mask(y)
        xt = attack.apply(x[sel], y[sel])
        feats.append(adapter.features(model, xt)); labels.append(y[sel])
        poisoned.append(torch.ones(int(sel.sum()), dtype=torch.bool, device=y.device))
    return {"features": torch.cat(feats).float().cpu().numpy(), "labels": torch.cat(labels).cpu().numpy(),
            "poisoned": torch.cat(poisoned).cpu().numpy()}
