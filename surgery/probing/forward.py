"""One streaming pass of a model over tokenised texts, with hooks that keep only what the analyses need.

Per batch, the block hooks mean-pool each layer's output over the text's tokens and write the
(layers, batch, hidden) result to a FeatureStore (a temporary file, read back one layer at a time);
the MLP hooks add, per language, how many tokens activated each neuron. Memory is bounded by one
batch: nothing grows with the number of texts except the token ids and a counter per neuron.
"""

from __future__ import annotations

import os

import numpy as np


class FeatureStore:
    """(layers, rows, hidden) float32 in a file: written a batch of consecutive rows at a time, read per layer."""

    def __init__(self, path, n_layers: int, n_rows: int):
        self.path, self.n_layers, self.n_rows, self.hidden = str(path), n_layers, n_rows, None
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(self, row: int, pooled: np.ndarray) -> None:
        """pooled: (layers, batch, hidden) for rows row .. row+batch-1."""
        if self.hidden is None:
            self.hidden = pooled.shape[2]
            os.ftruncate(self._fd, self.n_layers * self.n_rows * self.hidden * 4)
        pooled = np.ascontiguousarray(pooled, dtype=np.float32)
        for layer in range(self.n_layers):
            offset = (layer * self.n_rows + row) * self.hidden * 4
            os.pwrite(self._fd, pooled[layer].tobytes(), offset)

    def layer(self, layer: int) -> np.ndarray:
        size = self.n_rows * self.hidden * 4
        buf = os.pread(self._fd, size, layer * size)
        return np.frombuffer(buf, dtype=np.float32).reshape(self.n_rows, self.hidden)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Collector:
    """Forward hooks on the points of one model; call ``batch(...)`` before each forward."""

    def __init__(self, points, n_langs: int, lape: bool):
        import torch

        self.torch = torch
        self.n_langs, self.lape = n_langs, lape
        self.pos = {i: n for n, (i, _) in enumerate(points.layers)}
        self.counts: dict[int, "torch.Tensor"] = {}
        self.pooled: list = [None] * len(points.layers)
        self.handles = [m.register_forward_hook(self._layer_hook(i)) for i, m in points.layers]
        if lape:
            self.handles += [m.register_forward_hook(self._mlp_hook(i, fused)) for i, m, fused in points.mlp]

    def batch(self, mask, lang_weights) -> None:
        """mask: (B, T) float; lang_weights: (B, T, K) float, 1 where a token counts for language k, or None."""
        self.mask, self.lengths = mask, mask.sum(1, keepdim=True).clamp(min=1)
        self.lang_weights = lang_weights

    def _layer_hook(self, layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            pooled = (h.float() * self.mask[..., None]).sum(1) / self.lengths
            self.pooled[self.pos[layer]] = pooled.cpu().numpy()
        return hook

    def _mlp_hook(self, layer: int, fused: bool):
        def hook(module, args, output):
            if self.lang_weights is None:
                return
            act = output[..., : output.shape[-1] // 2] if fused else output
            active = (act > 0).to(self.lang_weights.dtype)
            batch = self.torch.einsum("btk,bti->ki", self.lang_weights, active).round().to(self.torch.int64)
            if layer in self.counts:
                self.counts[layer] += batch
            else:
                self.counts[layer] = batch
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run_forward(model, points, token_ids: list[list[int]], langs: np.ndarray, n_langs: int, store: FeatureStore,
                batch_size: int, device, pad_id: int, lape: bool, progress=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Run all texts, longest first (store row r holds text order[r]).

    Returns ({layer: (languages, neurons) int64 counts of activated tokens}, tokens per language, order).
    """
    import torch

    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    backbone = model.base_model  # the blocks without the LM head: logits are never needed
    collector = Collector(points, n_langs, lape)
    tokens = np.zeros(n_langs, dtype=np.int64)
    eye = torch.eye(n_langs, device=device) if n_langs else None
    try:
        with torch.no_grad():
            for row in range(0, len(order), batch_size):
                idx = order[row:row + batch_size]
                width = len(token_ids[idx[0]])
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.float32)
                for b, i in enumerate(idx):
                    ids[b, : len(token_ids[i])] = torch.tensor(token_ids[i])
                    mask[b, : len(token_ids[i])] = 1
                ids, mask = ids.to(device), mask.to(device)
                lang = torch.as_tensor(langs[idx], device=device)
                weights = None
                if lape and n_langs and bool((lang >= 0).any()):
                    onehot = eye[lang.clamp(min=0)] * (lang >= 0)[:, None]
                    weights = onehot[:, None, :] * mask[..., None]
                    np.add.at(tokens, langs[idx][langs[idx] >= 0],
                              [len(token_ids[i]) for i in idx if langs[i] >= 0])
                collector.batch(mask, weights)
                backbone(input_ids=ids, attention_mask=mask.long(), use_cache=False)
                store.write(row, np.stack(collector.pooled))
                if progress is not None:
                    progress.update(int(mask.sum().item()))
    finally:
        collector.remove()
    counts = {layer: c.cpu().numpy() for layer, c in collector.counts.items()}
    return counts, tokens, np.asarray(order)
