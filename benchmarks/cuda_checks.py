"""Correctness checks that need a GPU (run by benchmarks/gpu_check.sh on a CUDA machine).

FlexAttention's backward exists only on GPU, so the CPU test suite compares the two attention
backends in the forward pass only; here both passes are compared, plus the fused loss on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.loss import linear_cross_entropy_sum
from model.args import LoraArgs
from model.lora import LoRALinear
from model.tiny import tiny_args
from model.transformer import Transformer


def _train_adapters_only(model) -> None:
    """Non-zero adapters (B too, so they change the output) that alone need gradients."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)


def _grads(model, tokens, seqlens, images=None):
    model.zero_grad(set_to_none=True)
    out = model(tokens, seqlens, images=images)
    out.float().logsumexp(-1).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worst_relative(grads: dict, reference: dict) -> float:
    """max over tensors of max |g - ref| / max |ref|, in float32 on the reference's device."""
    return max(((grads[k].float().to(r.device) - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-6)).item()
               for k, r in reference.items())


def check_attention_backends(dtype: torch.dtype, window: int | tuple[int | None, ...] | None, atol: float) -> None:
    torch.manual_seed(0)
    args = tiny_args(dim=256, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=512, sliding_window=window)
    model = Transformer(args, lora=LoraArgs(rank=8))
    model.init_weights(0)
    _train_adapters_only(model)
    model = model.cuda().to(dtype)
    seqlens = [300, 17, 700, 7]
    tokens = torch.randint(0, args.vocab_size, (sum(seqlens),), device="cuda")
    out_s, g_s = _grads(model, tokens, seqlens)
    model.attention_backend = "flex"
    out_f, g_f = _grads(model, tokens, seqlens)
    torch.testing.assert_close(out_f.float(), out_s.float(), atol=atol, rtol=atol)
    assert g_s.keys() == g_f.keys() and len(g_s) == 2 * 7 * 2  # every adapter of both layers
    worst = _worst_relative(g_f, g_s)
    assert worst < (0.05 if dtype == torch.bfloat16 else 1e-3), worst
    print(f"flex == sdpa on CUDA ({dtype}, window={window}): logits ok, worst relative grad diff {worst:.2e}")


def check_fused_loss() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(3000, 256, device="cuda", generator=g, requires_grad=True)
    w = torch.randn(131072, 256, device="cuda", generator=g) * 0.05
    y = torch.randint(0, 131072, (3000,), device="cuda", generator=g)
    ours = linear_cross_entropy_sum(h, w, y, 1024)
    ours.backward()
    gh = h.grad.clone()
    h.grad = None
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-5)
    print("fused chunked cross-entropy == F.cross_entropy on CUDA (vocab 131072)")
    # bf16: the default GPU block (2^24 logits = 128 rows here) gives the whole chunk's gradient.
    hb = h.detach().bfloat16()
    grads = []
    for block in (None, 1024):
        x = hb.clone().requires_grad_(True)
        linear_cross_entropy_sum(x, w.bfloat16(), y, 1024, block).backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    print("fused loss in bf16: float32 blocks of 128 rows == whole 1024-row chunks, bit for bit, on CUDA")


def check_checkpointing_and_compile_with_flex(dtype: torch.dtype) -> None:
    """Checkpointing keeps FlexAttention's output (a compiled higher-order op) and compiled blocks
    trace it into their graph: every (mode, compiled) pair gives the gradients of eager, no
    checkpointing."""
    from finetune.parallel import checkpoint_block, compile_block
    from model.attention import AttentionMask
    from model.lora import freeze_all_but_lora
    from model.rope import positions_from_seqlens, rope_frequencies
    from model.transformer import TransformerBlock

    args = tiny_args(dim=256, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=512)
    seqlens = [300, 17, 700, 7]
    freqs = rope_frequencies(positions_from_seqlens(seqlens, "cuda"), args.head_dim, args.rope_theta)
    mask = AttentionMask.build(seqlens, None, "flex", torch.device("cuda"))
    x0 = torch.randn(sum(seqlens), args.dim, device="cuda", dtype=dtype)
    grads = {}
    runs = [(mode, compiled) for compiled in (False, True) for mode in ("none", "full", "selective")]
    for mode, compiled in runs:
        torch.manual_seed(0)
        block = TransformerBlock(args, LoraArgs(rank=8))
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.05)
        block = block.cuda().to(dtype)
        freeze_all_but_lora(block)
        if mode != "none":
            checkpoint_block(block, mode)
        if compiled:
            compile_block(block)
        x = x0.clone().requires_grad_(True)
        (block(x, freqs, mask).float() ** 2).sum().backward()
        grads[mode, compiled] = {"x": x.grad, **{n: p.grad for n, p in block.named_parameters() if p.grad is not None}}
    reference = grads["none", False]
    for mode, compiled in runs[1:]:
        assert grads[mode, compiled].keys() == reference.keys()
        worst = _worst_relative(grads[mode, compiled], reference)
        # bf16: compiled code rounds fewer intermediates than eager (1e-2 between them on CPU).
        assert worst < (3e-2 if dtype == torch.bfloat16 else 1e-4), (mode, compiled, worst)
        print(f"checkpoint {mode}{', compiled' if compiled else ''} == eager none with flex on CUDA ({dtype}): "
              f"worst relative grad diff {worst:.2e}")


def check_latent_moe(dtype: torch.dtype, tolerance: float) -> None:
    """Mistral Small 4's layers on CUDA against the same model in float32 on the CPU: latent attention
    (values narrower than keys) on SDPA and FlexAttention, fine-grained MoE through CUDA's grouped GEMM
    (bf16; float32 takes the per-expert fallback), LoRA on every projection and expert; logits and
    every adapter gradient."""
    from model.args import MlaArgs

    torch.manual_seed(0)
    mla = MlaArgs(q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
    moe = {"num_experts": 16, "num_experts_per_tok": 4, "expert_hidden_dim": 128, "num_shared_experts": 1,
           "first_k_dense_replace": 1}
    args = tiny_args(dim=256, n_heads=8, n_kv_heads=8, head_dim=96, hidden_dim=512, mla=mla, moe=moe)
    model = Transformer(args, lora=LoraArgs(rank=16))
    model.init_weights(0)
    _train_adapters_only(model)
    seqlens = [300, 17, 700, 7]
    tokens = torch.randint(0, args.vocab_size, (sum(seqlens),))
    ref_out, ref_grads = _grads(model, tokens, seqlens)  # float32 on the CPU
    model = model.cuda().to(dtype)
    for backend in ("sdpa", "flex"):
        model.attention_backend = backend
        out, grads = _grads(model, tokens.cuda(), seqlens)
        scale = ref_out.abs().max().item()
        torch.testing.assert_close(out.float().cpu(), ref_out, atol=tolerance * scale, rtol=tolerance)
        assert grads.keys() == ref_grads.keys()
        worst = _worst_relative(grads, ref_grads)
        assert worst < (0.1 if dtype == torch.bfloat16 else 1e-3), (backend, worst)
        print(f"latent attention + fine-grained MoE on CUDA ({dtype}, {backend}) == float32 CPU: logits ok, "
              f"worst relative grad diff {worst:.2e}")


def check_vision(dtype: torch.dtype, tolerance: float) -> None:
    """The vision side on CUDA against float32 on the CPU: per-picture fused SDPA (4-D inputs: flash or
    memory-efficient on CUDA), the 2-D rotary table, the patch merger, features scattered onto the
    [IMG] tokens of a packed row; LoRA on the language model and every vision linear; logits and
    every adapter gradient, with pictures of three sizes in one row."""
    from model.args import DEFAULT_TARGETS, VISION_TARGETS
    from model.tiny import tiny_vision_args

    torch.manual_seed(0)
    args = tiny_vision_args(merge=2, dim=256, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=512)
    args.extra["vision_encoder"].update(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    model = Transformer(args, lora=LoraArgs(rank=8, target_modules=[*DEFAULT_TARGETS, *VISION_TARGETS]),
                        vision=True)
    model.init_weights(0)
    _train_adapters_only(model)
    img, brk, end = 10, 12, 13
    sizes = [(64, 96), (32, 32), (128, 64)]  # (H, W) in pixels: multiples of patch 16 x merge 2
    tokens: list[int] = []
    for h, w in sizes:  # each picture's [IMG] run, then some text
        run = ([img] * (w // 32) + [brk]) * (h // 32)
        run[-1] = end
        tokens += [1, 3, *run, *torch.randint(20, args.vocab_size, (40,)).tolist(), 4]
    tokens_t = torch.tensor(tokens)
    seqlens = [len(tokens) // 2, len(tokens) - len(tokens) // 2]
    images = [torch.randn(3, h, w) for h, w in sizes]
    ref_out, ref_grads = _grads(model, tokens_t, seqlens, images)  # float32 on the CPU
    model = model.cuda().to(dtype)
    out, got = _grads(model, tokens_t.cuda(), seqlens, [i.cuda() for i in images])
    scale = ref_out.abs().max().item()
    torch.testing.assert_close(out.float().cpu(), ref_out, atol=tolerance * scale, rtol=tolerance)
    assert got.keys() == ref_grads.keys() and any(k.startswith("vision_encoder.") for k in got)
    worst = _worst_relative(got, ref_grads)
    assert worst < (0.1 if dtype == torch.bfloat16 else 1e-3), worst
    print(f"vision side on CUDA ({dtype}) == float32 CPU: logits ok, worst relative grad diff {worst:.2e}")


if __name__ == "__main__":
    assert torch.cuda.is_available()
    print(torch.__version__, torch.cuda.get_device_name())
    check_fused_loss()
    for window in (None, 128, (None, 128)):  # full, windowed, interleaved (Ministral 8B's kind)
        check_attention_backends(torch.float32, window, 1e-4)
        check_attention_backends(torch.bfloat16, window, 3e-2)
    for dtype in (torch.float32, torch.bfloat16):
        check_checkpointing_and_compile_with_flex(dtype)
    check_latent_moe(torch.float32, 1e-4)
    check_latent_moe(torch.bfloat16, 5e-2)
    check_vision(torch.float32, 1e-4)
    check_vision(torch.bfloat16, 5e-2)
