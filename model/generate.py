"""Autoregressive decoding with a KV cache, for trying a (fine-tuned) model without another package.

Decoding runs the model's own blocks (``TransformerBlock``: norms, residuals, LoRA/plain linears,
feed-forward, RoPE); only the attention *kernel* differs: given a ``CacheStep`` (``model/kv_cache.py``),
a batch of sequences attends to a padded cache of past keys and values instead of to a packed row, so
one token per sequence costs one small forward. Images (a model built with ``vision=True``) enter
at the prefill: their features replace the prompt's ``[IMG]`` embeddings (``Transformer.embed``), so
the cache holds the keys and values of the image tokens and decoding never reruns the encoder.
Latent attention (``model.mla``) caches its latents, not per-head keys and values, and attends in
latent space. ``tests/test_tools_generate.py``, ``tests/test_mla_decoding.py`` and
``tests/test_generate_images.py`` check that cached decoding equals a full forward pass, token for
token and logit for logit.
"""

from __future__ import annotations

import torch

from model.kv_cache import KVCache
from model.rope import rotations
from model.transformer import Transformer


@torch.no_grad()
def forward_cached(
    model: Transformer,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    images: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits (batch, T, vocab) of ``tokens`` (batch, T) at ``positions`` (batch, T), given the cache;
    this step's keys and values are added to it. ``images``: the (C, H, W) images of the ``[IMG]``
    runs in ``tokens``, row by row in order of appearance (padding must not be ``[IMG]``)."""
    a = model.args
    b, t = tokens.shape
    freqs = rotations(positions.reshape(-1), a)  # the model's rotary variant, as in training
    h = model.embed(tokens.reshape(-1), images)  # (batch*T, dim): row-major, so images stay in order
    for layer, step in zip(model.layers, cache.steps(positions), strict=True):
        h = layer(h, freqs, None, step)
    return model.output(model.norm(h)).view(b, t, -1)  # (batch, T, vocab)


def _pick(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row of ``logits`` (batch, vocab): argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p, 1, generator=generator)  # (batch, 1)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_cache: bool = True,
    seed: int | None = None,
    images: list[list[torch.Tensor]] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (EOS excluded), stopping at ``eos_id`` or ``max_new_tokens``.

    ``images[i]`` are prompt i's (C, H, W) images in order of appearance (mistral-common's
    ``encode_chat_completion(...).images``); they are encoded once, at the prefill.
    ``use_cache=False`` recomputes the whole packed sequence with ``model.forward`` at every step:
    slow, but it is the reference the cached path is tested against.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"images has {len(images)} lists for {len(prompts)} prompts; give one list per prompt.")
    device = next(model.parameters()).device
    flat_images = [img.to(device) for per_prompt in images for img in per_prompt] if images else None
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    lengths = [len(p) for p in prompts]
    b = len(prompts)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b

    if use_cache:
        cache = KVCache.empty(model, b, max(lengths) + max_new_tokens)
        padded = torch.zeros(b, max(lengths), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = torch.tensor(p, device=device)
        positions = torch.arange(max(lengths), device=device).expand(b, -1)  # (batch, prompt_len)
        logits = forward_cached(model, padded, positions, cache, flat_images)  # (batch, prompt_len, vocab)
        last = logits[
            torch.arange(b, device=device), torch.tensor(lengths, device=device) - 1
        ]  # (batch, vocab)
    else:
        seqs = [list(p) for p in prompts]
        last = _full_last_logits(model, seqs, device, flat_images)

    pos = torch.tensor(lengths, device=device)  # (batch,): where each next token goes
    for step in range(max_new_tokens):
        nxt = _pick(last.float(), temperature, top_p, generator)  # (batch,)
        for i, token in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if eos_id is not None and token == eos_id:
                done[i] = True
            else:
                out[i].append(token)
        if all(done) or step == max_new_tokens - 1:
            break
        if use_cache:
            last = forward_cached(model, nxt[:, None], pos[:, None], cache)[:, 0]  # (batch, vocab)
        else:
            for i, token in enumerate(nxt.tolist()):
                seqs[i].append(token)
            last = _full_last_logits(model, seqs, device, flat_images)
        pos = pos + 1
    return out


def _full_last_logits(
    model: Transformer, seqs: list[list[int]], device: torch.device, images: list[torch.Tensor] | None
) -> torch.Tensor:
    """Last-position logits of each sequence from one packed full forward; (batch, vocab)."""
    flat = torch.tensor([t for s in seqs for t in s], device=device)
    logits = model(flat, [len(s) for s in seqs], images=images)  # (tokens, vocab)
    ends = torch.tensor([len(s) for s in seqs], device=device).cumsum(0) - 1
    return logits[ends]
