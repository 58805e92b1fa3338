"""The benchmark workload shared by our benchmark (``utils.bench_train_step``) and the Hugging Face
one (``benchmarks/bench_hf.py``): model shapes and packed rows of random documents. NumPy only, so the
Hugging Face venv can import it too."""

from __future__ import annotations

import numpy as np

PRESETS = {
    # The reference CPU config of docs/benchmarks.md.
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1536, vocab_size=32768),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=32768),
    "nemo": dict(dim=5120, n_layers=40, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=131072),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=32768),
}


def packed_rows(n: int, seq_len: int, batch_size: int, doc_min: int, doc_max: int, vocab: int, seed: int = 0):
    """``n`` batches of (x, y, y_mask, seqlens): rows of random documents with lengths in
    [doc_min, doc_max]; the tail of a row is filler (not a target)."""
    if not 1 <= doc_min <= doc_max:  # a 0-token document would never fill the row
        raise ValueError(f"--doc_min {doc_min} / --doc_max {doc_max}: need 1 <= doc_min <= doc_max.")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seqlens, mask = [], []
        for _ in range(batch_size):
            used = 0
            while seq_len - used >= doc_min:
                length = int(min(rng.integers(doc_min, doc_max + 1), seq_len - used))
                seqlens.append(length)
                mask.append(np.ones(length, bool))
                used += length
            if used < seq_len:
                seqlens.append(seq_len - used)
                mask.append(np.zeros(seq_len - used, bool))
        x = rng.integers(0, vocab, seq_len * batch_size).astype(np.int64)
        y = rng.integers(0, vocab, seq_len * batch_size).astype(np.int64)
        out.append((x, y, np.concatenate(mask), seqlens))
    return out
