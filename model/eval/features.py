"""Batched image / text embedding for evaluation (no gradients, model in eval mode)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

# progress(done, total): called after every batch.
Progress = Callable[[int, int], None]


@torch.no_grad()
def encode_images(umg, dataset: Dataset, *, batch_size: int = 64, device: str | torch.device = "cpu",
                  workers: int = 0, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings of a dataset of ``(image (3, S, S), label)`` items, in dataset order.

    Returns:
        (N, E) float32 L2-normalised embeddings and the (N,) int64 labels, both on the CPU.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    embeddings, labels, done = [], [], 0
    for images, batch_labels in loader:
        emb, _ = umg.encode_image(images.to(device))
        embeddings.append(emb.float().cpu())
        labels.append(torch.as_tensor(batch_labels))
        done += len(images)
        if progress is not None:
            progress(done, len(dataset))
    return torch.cat(embeddings), torch.cat(labels).long()


@torch.no_grad()
def encode_texts(umg, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(T, E) float32 L2-normalised text embeddings on the CPU."""
    device = next(umg.parameters()).device
    return torch.cat([umg.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device)).float().cpu()
                      for i in range(0, len(texts), batch_size)])
