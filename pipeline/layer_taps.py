"""Which module of a transformers causal LM outputs its ``output_hidden_states[i]``: for forward hooks that
capture one layer's hidden states without keeping every layer's (the cache stage's teacher layers,
``kdcache.cache.hidden``; the student's feature layer, ``kdcache.features``).

Index i as in ``output_hidden_states`` (num_layers + 1 entries): 0 = the input embeddings' output, i in
[1, num_layers - 1] = decoder layer i's output (``decoder.layers[i - 1]``, ``h`` or ``blocks``), num_layers = the
decoder's output, i.e. the final normed state the LM head reads (what transformers reports as the last entry).
"""

from __future__ import annotations

from typing import Any

import torch


def model_shape(model: Any) -> tuple[int, int]:
    """(decoder layers, hidden width) of a transformers causal LM."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers), int(model.get_input_embeddings().weight.shape[1])


def layer_module(model: Any, layer: int, num_layers: int) -> torch.nn.Module | None:
    """The module whose forward output is ``output_hidden_states[layer]`` (0 <= layer <= num_layers); None when
    the decoder has no list of ``num_layers`` blocks to tap."""
    if layer == 0:
        return model.get_input_embeddings()
    decoder = model.get_decoder()
    if layer == num_layers:
        return decoder  # its output's [0] (last_hidden_state)
    blocks = next((getattr(decoder, n) for n in ("layers", "h", "blocks") if hasattr(decoder, n)), None)
    return blocks[layer - 1] if blocks is not None and len(blocks) == num_layers else None


def hook_output(out: Any) -> torch.Tensor:
    """A tapped module's hidden states: the output itself, or its first element (tuples, model outputs)."""
    return out if isinstance(out, torch.Tensor) else out[0]
