"""BAGEL's language model: Qwen2 with Mixture-of-Transformer-Experts (MoT) layers.

Every decoder layer holds two full sets of weights: the understanding expert (Qwen2.5's own names) and the
generation expert (the same names with `_moe_gen`). Routing is hard, by token type: VAE latent tokens (noisy
or clean) use the generation expert, everything else (text, ViT tokens, the image marker tokens) the
understanding expert. Attention is shared: all tokens of a sequence attend to each other in one softmax.

Inference keeps a key/value cache per CFG branch (`KVContext`). Context blocks (text, ViT image, clean VAE
image) are prefilled into it with `forward_with_kv`; the noisy image being generated is a query block that
attends to the context and is never cached, through the layers' plain `forward` — the call that TeaCache
hooks and the engine counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from torch import nn

from .config import LanguageModelConfig

Rotary = tuple[torch.Tensor, torch.Tensor]
KeyValue = tuple[torch.Tensor, torch.Tensor]


def route(
    x: torch.Tensor,
    gen_tokens: slice | None,
    understanding: Callable[[torch.Tensor], torch.Tensor],
    generation: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Apply `generation` to the tokens `gen_tokens` of x [batch, tokens, ...] and `understanding` to the others.

    A block of BAGEL's packed sequence has its generation tokens in one contiguous run (the latents between the
    two image markers), so the routing is a slice rather than an index list.
    """
    if gen_tokens is None:
        return understanding(x)
    start, stop = gen_tokens.start, gen_tokens.stop
    others = understanding(torch.cat([x[:, :start], x[:, stop:]], dim=1))
    return torch.cat([others[:, :start], generation(x[:, start:stop]), others[:, start:]], dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_embedding(positions: torch.Tensor, head_dim: int, theta: float) -> Rotary:
    """Qwen2's 1-D RoPE (rotate-half layout) for integer `positions`, in float32: cos, sin [tokens, head_dim]."""
    inverse_frequencies = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    )
    angles = positions.float()[:, None] * inverse_frequencies[None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """x [batch, tokens, heads, head_dim] in float32."""
    cos, sin = (part[None, :, None, :] for part in rotary)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class SwiGLU(nn.Module):
    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    """Grouped-query attention with one projection set per expert and q/k RMSNorm over each head."""

    # The output projections of the understanding and the generation expert (the others are found by name).
    o_proj: nn.Linear
    o_proj_moe_gen: nn.Linear

    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        hidden, kv_dim, eps = config.hidden_size, config.num_key_value_heads * config.head_dim, config.rms_norm_eps
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(hidden, hidden, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(hidden, kv_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(hidden, kv_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(hidden, hidden, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(self.head_dim, eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(self.head_dim, eps))

    def _heads(self, x, gen_tokens, projection: str, norm: str | None, num_heads: int) -> torch.Tensor:
        def expert(suffix: str):
            def run(tokens: torch.Tensor) -> torch.Tensor:
                out = getattr(self, projection + suffix)(tokens).unflatten(-1, (num_heads, self.head_dim))
                # q/k are normalised in float32, as the official inference code does before RoPE.
                return out if norm is None else getattr(self, norm + suffix)(out.float())

            return run

        return route(x, gen_tokens, expert(""), expert("_moe_gen"))

    def forward(
        self,
        x: torch.Tensor,
        *,
        rotary: Rotary,
        gen_tokens: slice | None,
        past: KeyValue | None,
        causal: bool,
    ) -> tuple[torch.Tensor, KeyValue]:
        """Attend the block x [batch, tokens, hidden] to `past` and to itself; also return the block's keys/values.

        causal: each token sees every past token and the block's tokens up to itself (text); else all (images).
        """
        dtype = x.dtype
        query = apply_rotary(self._heads(x, gen_tokens, "q_proj", "q_norm", self.num_heads), rotary).to(dtype)
        key = apply_rotary(self._heads(x, gen_tokens, "k_proj", "k_norm", self.num_kv_heads), rotary).to(dtype)
        value = self._heads(x, gen_tokens, "v_proj", None, self.num_kv_heads)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [batch, heads, tokens, head_dim]
        all_keys, all_values = key, value
        if past is not None:
            batch = x.shape[0]
            all_keys = torch.cat([past[0].expand(batch, -1, -1, -1), key], dim=2)
            all_values = torch.cat([past[1].expand(batch, -1, -1, -1), value], dim=2)
        mask = None
        if causal:
            # Bottom-right aligned: block token i sees every cached token and the block's tokens 0..i.
            cached = all_keys.shape[2] - query.shape[2]
            key_index = torch.arange(all_keys.shape[2], device=x.device)
            mask = key_index[None] <= torch.arange(query.shape[2], device=x.device)[:, None] + cached
        out = F.scaled_dot_product_attention(query, all_keys, all_values, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).flatten(2)
        return route(out, gen_tokens, self.o_proj, self.o_proj_moe_gen), (key, value)


class MoTDecoderLayer(nn.Module):
    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = MoTAttention(config)
        self.mlp = SwiGLU(config)
        self.mlp_moe_gen = SwiGLU(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.input_layernorm_moe_gen = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(config.hidden_size, eps)

    def forward(
        self, hidden_states: torch.Tensor, *, rotary: Rotary, gen_tokens: slice | None, past: KeyValue | None
    ) -> torch.Tensor:
        """A query block (the image being generated): attends to the context without being cached itself."""
        return self.forward_with_kv(hidden_states, rotary=rotary, gen_tokens=gen_tokens, past=past, causal=False)[0]

    def forward_with_kv(
        self,
        hidden_states: torch.Tensor,
        *,
        rotary: Rotary,
        gen_tokens: slice | None,
        past: KeyValue | None,
        causal: bool,
    ) -> tuple[torch.Tensor, KeyValue]:
        """A context block: the layer's output and the block's keys/values for the cache."""
        residual = hidden_states
        hidden = route(hidden_states, gen_tokens, self.input_layernorm, self.input_layernorm_moe_gen)
        hidden, key_value = self.self_attn(hidden, rotary=rotary, gen_tokens=gen_tokens, past=past, causal=causal)
        hidden = residual + hidden
        mlp_out = route(
            hidden,
            gen_tokens,
            lambda x: self.mlp(self.post_attention_layernorm(x)),
            lambda x: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(x)),
        )
        return hidden + mlp_out, key_value


# TeaCache finds a block's hidden states through diffusers' registry: the layer returns the tensor itself.
TransformerBlockRegistry.register(
    MoTDecoderLayer, TransformerBlockMetadata(return_hidden_states_index=None, return_encoder_hidden_states_index=None)
)


@dataclass
class KVContext:
    """One CFG branch's context: the cached keys/values of every layer and the next RoPE position.

    Appending builds new tensors, so a `copy()` shares the cache so far and then grows independently. The
    batch size of the cache is 1 (shared by all images of a request) or the number of images (once a block
    differs per image, e.g. an input image encoded with each image's own VAE noise).
    """

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    length: int = 0
    next_position: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> KVContext:
        return cls([None] * num_layers, [None] * num_layers)

    def copy(self) -> KVContext:
        return KVContext(list(self.keys), list(self.values), self.length, self.next_position)

    @property
    def batch_size(self) -> int:
        return 1 if self.keys[0] is None else self.keys[0].shape[0]

    def past(self, layer: int) -> KeyValue | None:
        key, value = self.keys[layer], self.values[layer]
        if key is None or value is None:
            return None
        return key, value

    def append(self, key_values: list[KeyValue], num_tokens: int, next_position: int) -> None:
        """Append a block's keys/values [batch, kv_heads, tokens, head_dim] (batch >= the cache's)."""
        for layer, (key, value) in enumerate(key_values):
            cached = self.past(layer)
            if cached is not None:
                batch = key.shape[0]
                key = torch.cat([cached[0].expand(batch, -1, -1, -1), key], dim=2)
                value = torch.cat([cached[1].expand(batch, -1, -1, -1), value], dim=2)
            self.keys[layer], self.values[layer] = key, value
        self.length += num_tokens
        self.next_position = next_position


class MoTQwen2Model(nn.Module):
    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def run(
        self,
        hidden: torch.Tensor,
        positions: list[int],
        *,
        context: KVContext,
        gen_tokens: slice | None,
        causal: bool = False,
        store: bool = False,
    ) -> torch.Tensor:
        """Run a block through every layer against `context`; with `store`, append the block to the context.

        Returns the final-normed hidden states [batch, tokens, hidden]. Only context blocks can be causal: a
        query block (not stored) is an image, which attends to all of its own tokens.
        """
        if causal and not store:
            raise ValueError("a causal block must be stored: query blocks are images, non-causal")
        config = self.config
        # A block shared by all images (text) joins a context that may already differ per image.
        hidden = hidden.expand(max(hidden.shape[0], context.batch_size), -1, -1)
        rotary = rotary_embedding(torch.tensor(positions, device=hidden.device), config.head_dim, config.rope_theta)
        key_values = []
        layers = cast(list[MoTDecoderLayer], list(self.layers))
        for index, layer in enumerate(layers):
            past = context.past(index)
            if store:
                hidden, key_value = layer.forward_with_kv(
                    hidden, rotary=rotary, gen_tokens=gen_tokens, past=past, causal=causal
                )
                key_values.append(key_value)
            else:
                hidden = layer(hidden_states=hidden, rotary=rotary, gen_tokens=gen_tokens, past=past)
        if store:
            context.append(key_values, len(positions), max(positions) + 1)
        return route(hidden, gen_tokens, self.norm, self.norm_moe_gen)


class BagelLanguageModel(nn.Module):
    """`language_model.*` of the checkpoint. `lm_head` (text answers) is loaded but unused by image generation."""

    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        self.model = MoTQwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
