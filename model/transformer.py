"""The Mistral decoder-only transformer over a packed batch of documents.

``forward(input_ids[tokens], seqlens) -> logits[tokens, vocab]``: documents are concatenated into
one row, attend only within themselves (causally, within each layer's sliding window if any), and their
rotary positions restart at 0.

A multimodal checkpoint built with ``vision=True`` also has the Pixtral encoder and its adapter
(``model.vision``): ``forward(input_ids, seqlens, images)`` replaces the embeddings of the row's
``[IMG]`` tokens, in order, with the features of its images, in order of appearance. Without it
(the default) the vision weights are carried, not built (``model.multimodal``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.args import LoraArgs, ModelArgs
from model.attention import Attention, AttentionMask
from model.configs import load_model_args
from model.kv_cache import CacheStep
from model.lora import linear_factory
from model.mla import LatentAttention
from model.moe import FeedForward, MoeLayer
from model.multimodal import token_side, vision_block
from model.norm import RMSNorm, _RMSNormFunction  # noqa: F401 (the norm lived here; re-exported)
from model.rope import positions_from_seqlens, rotations
from model.vision import PatchMerger, VisionEncoder, VisionLanguageAdapter, check_images


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, lora: LoraArgs | None, layer: int = 0) -> None:
        super().__init__()
        make_linear = linear_factory(lora)
        self.attention: nn.Module = (
            LatentAttention(args, make_linear) if args.mla is not None else Attention(args, make_linear)
        )
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: nn.Module = (
            MoeLayer(args, lora) if args.is_moe_layer(layer)
            else FeedForward(args.dim, args.hidden_dim, linear_factory(lora, scope="feed_forward."))
        )

    def forward(
        self, x: torch.Tensor, freqs: torch.Tensor, mask: AttentionMask | None, cache: CacheStep | None = None
    ) -> torch.Tensor:
        """``x`` (tokens, dim) -> (tokens, dim); ``cache`` only when decoding (``model.generate``)."""
        h = x + self.attention(self.attention_norm(x), freqs, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(
        self, args: ModelArgs, lora: LoraArgs | None = None, attention_backend: str = "sdpa", vision: bool = False
    ) -> None:
        super().__init__()
        # The kernel's name (model/attention.py BACKENDS); each block's ``attention`` is the module.
        self.args, self.lora, self.attention_backend = args, lora, attention_backend
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, lora, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tied_embeddings:
            # One parameter under two names: named_parameters() lists it once, as tok_embeddings.weight.
            self.output.weight = self.tok_embeddings.weight
        self.vision = vision_block(args.extra) if vision else None
        if vision:
            self._build_vision()

    def _build_vision(self) -> None:
        """The encoder and adapter under their native checkpoint names (``model.multimodal``)."""
        v = self.vision
        if v is None:
            raise ValueError("vision=True needs a params.json 'vision_encoder' block (a multimodal checkpoint).")
        # Adapters only on the vision layers lora.target_modules names in full (model.args.VISION_TARGETS).
        self.vision_encoder = VisionEncoder(v, self.lora)
        if v.get("add_pre_mm_projector_layer_norm"):
            # transformers takes the text model's eps here; Mistral's releases use 1e-5 for both.
            self.pre_mm_projector_norm = RMSNorm(v["hidden_size"], self.args.norm_eps)
        if v.get("mm_projector_id") == "patch_merge":
            self.patch_merger = PatchMerger(v["hidden_size"], v["spatial_merge_size"], self.lora)
        self.vision_language_adapter = VisionLanguageAdapter(
            v["hidden_size"], self.args.dim, bool(v.get("adapter_bias")), self.lora
        )

    def image_features(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(C, H, W) images -> (image tokens, dim): the embeddings of their ``[IMG]`` tokens, in order."""
        check_images(images, self.vision)
        x, grids = self.vision_encoder(images)  # (patches, vision dim)
        if hasattr(self, "pre_mm_projector_norm"):
            x = self.pre_mm_projector_norm(x)
        if hasattr(self, "patch_merger"):
            x = self.patch_merger(x, grids)  # (patches / merge², vision dim)
        return self.vision_language_adapter(x)  # (image tokens, dim)

    def embed(
        self, input_ids: torch.Tensor, images: list[torch.Tensor] | None, always_encode: bool = False
    ) -> torch.Tensor:
        """Token embeddings (tokens, dim), the ``[IMG]`` tokens' replaced by the images' features.

        ``always_encode``: a vision model given no images still runs its vision side, on one smallest
        blank picture whose features enter the embeddings times zero. Data-parallel training needs it:
        every rank then runs the same modules in the same order, and the embeddings depend on the
        vision weights (gradients included) whatever a rank's batch holds."""
        h = self.tok_embeddings(input_ids)  # (tokens, dim)
        if not images and always_encode and self.vision is not None:
            side = token_side(self.vision)
            blank = torch.zeros(self.vision["num_channels"], side, side, device=h.device)
            return h + 0.0 * self.image_features([blank]).sum().to(h.dtype)
        if not images:
            return h
        if self.vision is None:
            raise ValueError("images were given to a model built without its vision encoder; build it with vision=True.")
        features = self.image_features(images)
        slots = input_ids == self.vision["image_token_id"]  # (tokens,)
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(
                f"the row has {int(slots.sum())} [IMG] tokens (id {self.vision['image_token_id']}) but its "
                f"{len(images)} image(s) give {features.shape[0]} features; tokenize images and text together."
            )
        return h.masked_scatter(slots[:, None], features.to(h.dtype))  # out of place: autograd reaches both

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Seeded random base weights (tiny test and quickstart models); adapters are reset."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in sorted(self.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif ".lora_" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for m in self.modules():
            if hasattr(m, "reset_lora_parameters"):
                m.reset_lora_parameters()

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        seqlens: list[int],
        images: list[torch.Tensor] | None = None,
        always_encode: bool = False,
    ) -> torch.Tensor:
        """Final normed hidden states (tokens, dim): lets a loss apply ``output`` chunk by chunk;
        ``always_encode`` as in ``embed``."""
        if input_ids.dim() != 1 or input_ids.shape[0] != sum(seqlens):
            raise ValueError(
                f"input_ids must be 1-D with sum(seqlens) tokens; got shape {tuple(input_ids.shape)} "
                f"and sum(seqlens)={sum(seqlens)}"
            )
        positions = positions_from_seqlens(seqlens, input_ids.device)
        freqs = rotations(positions, self.args)  # plain or YaRN, with llama-4 query scaling if any
        masks = AttentionMask.per_layer(seqlens, self.args.layer_windows, self.attention_backend, input_ids.device)
        h = self.embed(input_ids, images, always_encode)  # (tokens, dim)
        for layer, mask in zip(self.layers, masks, strict=True):
            h = layer(h, freqs, mask)
        return self.norm(h)

    def forward(
        self, input_ids: torch.Tensor, seqlens: list[int], images: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        return self.output(self.hidden_states(input_ids, seqlens, images))  # (tokens, vocab)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        lora: LoraArgs | None = None,
        attention_backend: str = "sdpa",
        vision: bool = False,
    ) -> Transformer:
        """Load a Mistral checkpoint folder onto one device (training shards via finetune.parallel).

        The model is built on the meta device and the checkpoint tensors are assigned into it one
        by one, so the weights exist once in memory; adapters are then freshly initialised.
        ``vision=True`` builds and loads a multimodal checkpoint's encoder and adapter too.
        """
        from model.checkpoint import init_adapters, load_base_weights

        args = load_model_args(folder)
        with torch.device("meta"):
            model = cls(args, lora=lora, attention_backend=attention_backend, vision=vision)
        load_base_weights(model, folder, device=device, dtype=dtype)
        init_adapters(model, device=device, dtype=dtype)
        return model
