"""A contiguous range of a decoder's layers: one pipeline stage (or the whole model)."""

from __future__ import annotations

import torch
from torch import nn

from swarm.errors import InvalidRequestError
from swarm.model.config import ModelConfig
from swarm.model.hf_names import hf_to_stage_state, stage_state_to_hf
from swarm.model.kv_cache import CacheStep, KVCache
from swarm.model.layers import GPT2Block, LlamaBlock, RMSNorm, rotary_cos_sin


class StageModel(nn.Module):
    """Layers ``[first_layer, last_layer)`` of a decoder, plus the ends it owns.

    The first stage owns the token (and, for GPT-2, position) embeddings and takes token ids
    (B, T) int64; other stages take hidden states (B, T, hidden). The last stage owns the final
    norm and the LM head and returns logits (B, T, vocab); other stages return hidden states.
    The whole model is one stage that is both first and last.

    Tied embeddings: when one stage holds both ends, ``lm_head.weight`` *is* the embedding
    weight. When the model is split, the last stage holds its own ``lm_head.weight`` (loaded from
    the embedding); training that must keep them tied sums the two gradients across stages.
    """

    def __init__(self, config: ModelConfig, first_layer: int, last_layer: int, *, is_first: bool, is_last: bool) -> None:
        super().__init__()
        if not 0 <= first_layer <= last_layer <= config.num_layers:
            raise InvalidRequestError(
                f"layer range [{first_layer}, {last_layer}) is not inside the model's {config.num_layers} layers"
            )
        if is_first and first_layer != 0:
            raise InvalidRequestError(f"the first stage must start at layer 0, not {first_layer}")
        if is_last and last_layer != config.num_layers:
            raise InvalidRequestError(f"the last stage must end at layer {config.num_layers}, not {last_layer}")
        if first_layer == last_layer and not (is_first or is_last):
            raise InvalidRequestError("a middle stage needs at least one layer")
        self.config = config
        self.first_layer, self.last_layer = first_layer, last_layer
        self.is_first, self.is_last = is_first, is_last
        h = config.hidden_size
        gpt2 = config.family == "gpt2"
        if is_first:
            if gpt2:
                self.wte = nn.Embedding(config.vocab_size, h)
                self.wpe = nn.Embedding(config.max_position_embeddings, h)
            else:
                self.embed_tokens = nn.Embedding(config.vocab_size, h)
        block = GPT2Block if gpt2 else LlamaBlock
        self.layers = nn.ModuleList(block(config) for _ in range(first_layer, last_layer))
        if is_last:
            if gpt2:
                self.ln_f = nn.LayerNorm(h, eps=config.norm_eps)
            else:
                self.norm = RMSNorm(h, config.norm_eps)
            self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
            if is_first and config.tie_word_embeddings:
                self.lm_head.weight = self.input_embedding().weight

    @property
    def num_layers(self) -> int:
        return self.last_layer - self.first_layer

    def input_embedding(self) -> nn.Embedding:
        if not self.is_first:
            raise InvalidRequestError("only the first stage holds the token embedding")
        return self.wte if self.config.family == "gpt2" else self.embed_tokens

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's weights under HF checkpoint names (global layer indices).

        A tied head is left out (HF checkpoints of tied models store only the embedding), so
        merging the dicts of all stages gives a complete checkpoint for :func:`save_checkpoint`.
        """
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return stage_state_to_hf(self.config, state, self.first_layer)

    def load_hf_state(self, tensors: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        """Load weights from HF-named tensors (extra tensors of other stages are ignored).

        Raises InvalidRequestError when ``strict`` and a parameter of this stage is missing or has
        the wrong shape.
        """
        local = hf_to_stage_state(
            self.config, tensors, self.first_layer, self.last_layer, is_first=self.is_first, is_last=self.is_last
        )
        own = self.state_dict()
        missing = [k for k in own if k not in local]
        if self.is_first and self.is_last and self.config.tie_word_embeddings and "lm_head.weight" in missing:
            missing.remove("lm_head.weight")  # the same Parameter as the embedding
        if strict and missing:
            raise InvalidRequestError(
                f"checkpoint lacks {len(missing)} tensors of layers [{self.first_layer}, {self.last_layer}), "
                f"e.g. {missing[:3]}; is it the right model?"
            )
        for k, t in local.items():
            if k in own and own[k].shape != t.shape:
                raise InvalidRequestError(
                    f"checkpoint tensor for {k} has shape {tuple(t.shape)}, the model expects {tuple(own[k].shape)}"
                )
        with torch.no_grad():
            for k, t in local.items():
                if k in own:
                    own[k].copy_(t)

    def new_kv_cache(
        self, *, batch_size: int, max_length: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty KV cache for this stage's layers, on this stage's device and dtype by default."""
        p = next(self.parameters())
        return KVCache(
            self.config, self.num_layers, batch_size=batch_size, max_length=max_length,
            device=device or p.device, dtype=dtype or p.dtype,
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        position_offset: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Run the stage. ``x``: token ids (B, T) on the first stage, hidden (B, T, H) elsewhere.

        Positions are ``position_offset + t`` (an int, or (B,) per row) without a cache; with a
        ``kv_cache`` they start at each row's cache length (``position_offset`` must be 0), and the
        cache advances by T. Returns logits (B, T, vocab) on the last stage, else hidden (B, T, H).
        """
        if self.is_first:
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
                raise InvalidRequestError(f"the first stage takes token ids (B, T) int64, got {tuple(x.shape)} {x.dtype}")
            B, T = x.shape
        else:
            if x.dim() != 3 or x.shape[-1] != self.config.hidden_size or not x.is_floating_point():
                raise InvalidRequestError(
                    f"stage at layer {self.first_layer} takes hidden states (B, T, {self.config.hidden_size}), "
                    f"got {tuple(x.shape)} {x.dtype}"
                )
            B, T, _ = x.shape
        device = x.device
        if kv_cache is not None:
            if not (isinstance(position_offset, int) and position_offset == 0):
                raise InvalidRequestError("with a kv_cache positions come from the cache; leave position_offset at 0")
            if kv_cache.num_layers != self.num_layers:
                raise InvalidRequestError(
                    f"KV cache has {kv_cache.num_layers} layers, this stage {self.num_layers}; use stage.new_kv_cache()"
                )
            start = kv_cache.lengths.to(device)
        else:
            start = torch.as_tensor(position_offset, dtype=torch.long, device=device).reshape(-1).expand(B)
        positions = start[:, None] + torch.arange(T, device=device)[None, :]  # (B, T)
        # the cache span and mask, once for all layers (raises CapacityError when a row is full)
        step = kv_cache.begin_step(positions) if kv_cache is not None else None
        if T and int(positions.max()) >= self.config.max_position_embeddings:
            raise InvalidRequestError(
                f"position {int(positions.max())} is past the model's max_position_embeddings "
                f"{self.config.max_position_embeddings}; shorten the input"
            )

        return self._layers(x, positions, kv_cache, step, T)  # (B, T, H|vocab)

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache | None, step: CacheStep | None,
                advance: int | torch.Tensor) -> torch.Tensor:
        """Embed (first stage), run the layers at ``positions`` (B, T), advance the cache by
        ``advance`` and apply the head (last stage): what :meth:`forward` and
        :meth:`decode_fixed` share."""
        if self.is_first:
            if self.config.family == "gpt2":
                h = self.wte(x) + self.wpe(positions)  # (B, T, H)
            else:
                h = self.embed_tokens(x)
        else:
            h = x
        rope = None
        if self.config.family == "llama" and self.layers:
            rope = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
        for i, block in enumerate(self.layers):
            h = block(h, kv_cache=kv_cache, layer=i, step=step, rope=rope)
        if kv_cache is not None:
            kv_cache.advance(advance)
        if self.is_last:
            h = self.ln_f(h) if self.config.family == "gpt2" else self.norm(h)
            return self.lm_head(h)
        return h

    def decode_fixed(self, x: torch.Tensor, kv_cache: KVCache, active: torch.Tensor | None = None) -> torch.Tensor:
        """One decode position per row (T = 1) with shapes that never change and no host sync:
        the queries read the whole preallocated cache, masked by each row's length (a tensor on
        the device), instead of :meth:`forward`'s span up to the longest row. The same result as
        ``forward(x, kv_cache=kv_cache)`` up to rounding; what :mod:`swarm.inference.graphs`
        captures into a CUDA graph. The caller checks room (the runtime knows every row's length).

        ``active`` (B,) int64 of 0/1: only rows with 1 advance; the others (idle slots of a fixed
        batch, swarm/inference/slots.py) still compute, and write their keys and values at their
        length, which a later step overwrites or, for a full row, a scratch position past the
        served length takes (the cache's ``scratch_positions``, outside every attention span)."""
        lengths = kv_cache.lengths
        positions = lengths[:, None]  # (B, 1)
        if active is not None:  # an idle row may sit at the scratch position: past the model's limit
            positions = positions.clamp(max=self.config.max_position_embeddings - 1)
        key_pos = torch.arange(kv_cache.max_length, device=lengths.device)
        step = CacheStep(kv_len=kv_cache.max_length, mask=key_pos[None, None, None, :] <= lengths[:, None, None, None])
        return self._layers(x, positions, kv_cache, step, 1 if active is None else active)


def init_weights(stage: StageModel, *, generator: torch.Generator | None = None, std: float = 0.02) -> None:
    """GPT-style initialisation: N(0, std) matrices and embeddings, zero biases, unit norms."""
    with torch.no_grad():
        for module in stage.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()


def build_stage(
    config: ModelConfig,
    first_layer: int,
    last_layer_exclusive: int,
    *,
    is_first: bool | None = None,
    is_last: bool | None = None,
    seed: int | None = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StageModel:
    """Build a stage with freshly initialised weights (seeded; ``seed=None`` skips initialisation).

    ``is_first``/``is_last`` default to whether the range touches layer 0 / the last layer.
    The initialisation depends on the range, so separately built stages are *not* the pieces of
    one model: to split an existing model, build stages and :meth:`StageModel.load_hf_state` the
    whole model's :meth:`StageModel.hf_state_dict` (or load them from a checkpoint).
    """
    if is_first is None:
        is_first = first_layer == 0
    if is_last is None:
        is_last = last_layer_exclusive == config.num_layers
    stage = StageModel(config, first_layer, last_layer_exclusive, is_first=is_first, is_last=is_last)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        init_weights(stage, generator=gen)
    return stage.to(device=device, dtype=dtype)
