"""Hidden representations of every layer for a batch of texts, from an engine that gives hidden states.

The engine is one whose :attr:`~alignd.models.engine.Engine.supports_hidden_states` is True (the
``transformers`` reference engine, built by :func:`alignd.models.factory.build_reference_engine`); the
model runs through its :meth:`~alignd.models.engine.Engine.run_on_model`, never reached directly.

Layer numbering (``L`` = the model's decoder blocks, ``EngineInfo.num_layers`` /
``config.num_hidden_layers``; representations 0..L, so L + 1 of them):

* ``site="residual"`` (default): ``output_hidden_states=True`` of the base model. Representation
  ``i < L`` is the residual stream at the *input* of block ``i`` (``i = 0``: the token embeddings);
  representation ``L`` is the output of the last block after the final norm (what the LM head sees).
  Every ``transformers`` decoder gives these, so this site works for any architecture.
* ``site="normed"``: the paper's choice (Doimo et al.): the input of block ``i`` *after that block's
  input norm* (``layers[i].input_layernorm``), captured with forward hooks; representation ``L`` is
  the final norm's output, as above. It needs a Llama-like module layout (``layers[i].input_layernorm``
  and ``norm``) and says so when a model lacks it.

Pooling: ``"last"`` takes the state of each text's last token (the last prompt token, the paper's
choice); ``"mean"`` averages over the text's tokens. Both read the attention mask, so right and left
padding give the same numbers as running each text alone. Texts are tokenised with the engine's
``encode`` (no special tokens added), sorted by length and cut into batches of at most
``batch_size`` rows and ``max_batch_tokens`` padded tokens, so memory stays bounded whatever the mix
of lengths: a batch holds ``(L + 1) * rows * width * hidden`` floats of hidden states at its peak.
The LM head is never run (it would cost ``rows * width * vocab`` floats for nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from alignd.models.hf_engine import num_hidden_layers

Pooling = Literal["last", "mean"]
Site = Literal["residual", "normed"]
ProgressCallback = Callable[[float], None]

POOLINGS = ("last", "mean")
SITES = ("residual", "normed")


def num_layers(model_or_engine) -> int:
    """``L`` = the number of decoder blocks of an engine (``info.num_layers``) or of a ``transformers``
    model (its config); representations are numbered 0..L."""
    info = getattr(model_or_engine, "info", None)
    n = info.num_layers if info is not None else num_hidden_layers(model_or_engine.config)
    if n is None:
        raise ValueError(f"{type(model_or_engine).__name__} does not report its number of layers")
    return int(n)


def resolve_layers(layers: Sequence[int] | Literal["all"] | None, n_layers: int) -> list[int]:
    """Sorted, distinct representation indices; ``None`` / ``"all"`` = 0..n_layers. Out-of-range
    indices raise ``ValueError`` with the valid range."""
    if layers is None or layers == "all":
        return list(range(n_layers + 1))
    out = sorted(set(int(x) for x in layers))
    if not out:
        raise ValueError("layers is empty: give at least one layer index, or 'all'")
    bad = [x for x in out if x < 0 or x > n_layers]
    if bad:
        raise ValueError(
            f"layer(s) {bad} out of range: this model has {n_layers} blocks, so layers are 0..{n_layers} "
            f"(0 = embeddings, {n_layers} = after the final norm)"
        )
    return out


def _batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped by ascending length; each group has at most ``batch_size`` rows and at most
    ``max_batch_tokens`` padded tokens (a single over-long text still gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = max(lengths[i], max((lengths[j] for j in current), default=0))
        if current and (len(current) >= batch_size or (len(current) + 1) * width > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[row, cols] = torch.tensor(list(s), dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def _pool(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[rows, width, hidden] -> [rows, hidden] over the real (mask == 1) tokens only."""
    states = states.float()
    if pooling == "last":
        # index of the last real token, whichever side the padding is on
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
        return states[torch.arange(states.shape[0], device=states.device), last]
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1)


def _normed_sites(base, layers: Sequence[int], n_layers: int) -> dict[int, torch.nn.Module]:
    blocks = getattr(base, "layers", None)
    final_norm = getattr(base, "norm", None)
    if blocks is None or final_norm is None or not all(hasattr(b, "input_layernorm") for b in blocks):
        raise ValueError(
            f"site='normed' needs a Llama-like model (layers[i].input_layernorm and norm); "
            f"{type(base).__name__} has no such modules: use site='residual'"
        )
    return {layer: (blocks[layer].input_layernorm if layer < n_layers else final_norm) for layer in layers}


@torch.inference_mode()
def layer_representations_sync(
    model,
    token_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    pad_id: int,
    pooling: Pooling = "last",
    site: Site = "residual",
    batch_size: int = 16,
    max_batch_tokens: int = 8192,
    padding_side: Literal["left", "right"] = "right",
    progress: ProgressCallback | None = None,
) -> dict[int, np.ndarray]:
    """The synchronous core of :func:`layer_representations`, on token ids (one model call per batch).

    ``progress(fraction_of_texts_done)`` is called after every batch; it may raise to stop the work
    (the job manager's cancellation does that).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}; got {site!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
    if batch_size < 1 or max_batch_tokens < 1:
        raise ValueError("batch_size and max_batch_tokens must be >= 1")
    empty = [i for i, s in enumerate(token_ids) if len(s) == 0]
    if empty:
        raise ValueError(f"text {empty[0]} has no tokens; every text needs at least one token")
    n_layers = num_layers(model)
    layers = resolve_layers(layers, n_layers)
    base = model.base_model  # the decoder without the LM head
    device = next(model.parameters()).device
    out: dict[int, np.ndarray] = {}
    n = len(token_ids)

    captured: dict[int, torch.Tensor] = {}
    handles = []
    if site == "normed":
        for layer, module in _normed_sites(base, layers, n_layers).items():

            def hook(_module, _inputs, output, layer=layer):
                captured[layer] = output[0] if isinstance(output, tuple) else output

            handles.append(module.register_forward_hook(hook))
    try:
        done = 0
        for batch in _batches([len(s) for s in token_ids], batch_size, max_batch_tokens):
            ids, mask = _pad([token_ids[i] for i in batch], pad_id, padding_side)
            ids, mask = ids.to(device), mask.to(device)
            # positions count real tokens only, so a left-padded row sees the same positions as alone
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            captured.clear()
            result = base(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=False,
                output_hidden_states=site == "residual",
            )
            states = {layer: result.hidden_states[layer] for layer in layers} if site == "residual" else captured
            rows = torch.tensor(batch)
            for layer in layers:
                pooled = _pool(states[layer], mask, pooling).cpu().numpy()
                if layer not in out:
                    out[layer] = np.empty((n, pooled.shape[1]), dtype=np.float32)
                out[layer][rows.numpy()] = pooled
            del result, states
            captured.clear()
            done += len(batch)
            if progress is not None:
                progress(done / n)
    finally:
        for h in handles:
            h.remove()
    return out


async def layer_representations(
    engine,
    texts: Sequence[str],
    layers: Sequence[int] | Literal["all"] | None = None,
    pooling: Pooling = "last",
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
    *,
    site: Site = "residual",
    max_batch_tokens: int = 8192,
    padding_side: Literal["left", "right"] = "right",
    max_tokens: int | None = None,
) -> dict[int, np.ndarray]:
    """``{layer: float32 array [len(texts), hidden]}`` for the requested layers (default: all, 0..L).

    ``engine``: an :class:`alignd.models.engine.Engine` that :attr:`supports_hidden_states` (else a
    ``ValueError``). The work runs through ``engine.run_on_model``: in a worker thread, never at the
    same time as the engine's own model calls (generation included). ``max_tokens`` (default: the
    engine's context length) rejects over-long texts with a ``ValueError`` naming the first one. See
    the module docstring for ``site``, ``pooling`` and layer numbering.
    """
    if not texts:
        raise ValueError("texts is empty")
    if not engine.supports_hidden_states:
        raise ValueError(f"{type(engine).__name__} does not give hidden states; probes need the transformers engine")
    n_layers = num_layers(engine)
    layer_list = resolve_layers(layers, n_layers)
    limit = max_tokens or engine.info.max_model_len
    # Padding is masked out (attention and pooling), so any pad id gives the same numbers.
    tok = engine.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def work(model) -> dict[int, np.ndarray]:
        # tokenising here too, under the engine's lock: a fast tokenizer must not be used by two threads at once
        token_ids = [engine.encode(t) for t in texts]
        if limit:
            long = [i for i, s in enumerate(token_ids) if len(s) > limit]
            if long:
                i = long[0]
                raise ValueError(
                    f"text {i} has {len(token_ids[i])} tokens, above the model's context of {limit}; "
                    f"{len(long)} text(s) are too long"
                )
        return layer_representations_sync(
            model,
            token_ids,
            layer_list,
            pad_id=pad_id,
            pooling=pooling,
            site=site,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            padding_side=padding_side,
            progress=progress,
        )

    return await engine.run_on_model(work)
