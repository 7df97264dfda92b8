"""The engine's KV cache: preallocated slots, one row per running sequence, each sequence left-aligned in its row.

Per layer, keys and values live in one tensor each of shape (rows, kv_heads, length, head_dim). Row i holds the
i-th running sequence: its token t at column t, so a sequence never moves when others join or leave, and a
decode step writes each row's new key at that row's own column (its length so far)::

    row 0   a b c d e . . .     length 5: the next token's key goes to column 5
    row 1   f g . . . . . .     length 2
    row 2   h i j k . . . .     length 4

Attention reads columns [0, width) of the first ``batch`` rows, width being one more than the longest row
(eager) or a fixed bucket (CUDA graphs: the same shapes and addresses on every replay); the mask lets each row
see only its own columns up to its new token. Nothing is concatenated per step: the buffers grow (doubling)
only when a row or a column is missing, and a sequence that leaves frees its row by moving the last running
row into it.

A joining group is prefilled left-padded (``generate.py`` draws that layout) with this cache in "prefill" mode:
the group's keys attend among themselves (after a shared prefix's, when the engine has one) and are copied,
shifted left past each row's pads, into the rows given to the group.
"""

from __future__ import annotations

import torch

from tunesmith.errors import TunesmithError

ROW_BLOCK = 8
COLUMN_BLOCK = 256


def attention_kinds(config) -> tuple[str, ...]:
    """Each layer's attention kind ("full_attention" or "sliding_attention"); other kinds are refused."""
    kinds = getattr(config, "layer_types", None)
    if kinds is None:
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        kinds = ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers
    unknown = sorted(set(kinds) - {"full_attention", "sliding_attention"})
    if unknown:
        raise TunesmithError(f"the generation engine runs attention-only models; this model "
                             f"({config.model_type}) has {', '.join(unknown)} layers")
    return tuple(kinds)


def attention_masks(config, allowed: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor,
                    dtype: torch.dtype):
    """The 4D additive masks the model takes as given: ``allowed`` (batch, queries, keys) is causality and
    padding; a sliding-window layer also drops keys more than ``sliding_window`` positions back. One tensor
    when every layer is of one kind, else a mapping by kind (what models with mixed layers read)."""
    kinds = set(attention_kinds(config))
    low = torch.finfo(dtype).min
    masks = {}
    for kind in kinds:
        keep = allowed
        if kind == "sliding_attention":
            keep = keep & (query_positions[:, :, None] - key_positions[:, None, :] < config.sliding_window)
        masks[kind] = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, low)[:, None]
    return masks.popitem()[1] if len(masks) == 1 else masks


class SlotCache:
    """Duck-typed for transformers' models: they call ``update`` per layer and get back the keys and values to
    attend over. ``prefill`` and ``decode`` set what the next forward writes."""

    is_compileable = False

    def __init__(self, layers: int, device: torch.device):
        self.layers = layers
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.like: tuple[int, int, torch.dtype] | None = None  # (kv_heads, head_dim, dtype), from the first keys
        self._wanted = (0, 0)
        self._target = None  # what the next forward writes: set by prefill() or decode()
        self.version = 0  # bumped whenever the buffers are reallocated (recorded graphs hold their addresses)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) allocated."""
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def reserve(self, rows: int, columns: int) -> None:
        """Room for ``rows`` rows of ``columns`` columns (allocated at the first keys, whose shape it takes)."""
        self._wanted = (max(rows, self._wanted[0]), max(columns, self._wanted[1]))
        have_rows, have_columns = self.shape
        if self.like is None or (rows <= have_rows and columns <= have_columns):
            return
        new_rows = have_rows if rows <= have_rows else max(_rounded(rows, ROW_BLOCK), 2 * have_rows)
        new_columns = have_columns if columns <= have_columns else max(_rounded(columns, COLUMN_BLOCK),
                                                                       2 * have_columns)
        heads, head_dim, dtype = self.like
        for buffers in (self.keys, self.values):
            for layer in range(self.layers):
                grown = torch.zeros(new_rows, heads, new_columns, head_dim, dtype=dtype, device=self.device)
                if have_rows:
                    grown[:have_rows, :, :have_columns] = buffers[layer]
                    buffers[layer] = grown
                else:
                    buffers.append(grown)
        self.version += 1

    def prefill(self, first_row: int, sources: torch.Tensor, rows: int, prefix=None) -> None:
        """The next forward prefills rows [first_row, rows): ``sources`` (rows, columns) gives, for each column of
        a cache row, the column of the left-padded group it copies (a row's pads are skipped). ``prefix``: per
        layer, (keys, values) computed before for the rows' shared start, attended before the group's own."""
        self.reserve(rows, sources.shape[1])
        self._target = ("prefill", first_row, sources, prefix)

    def collect(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next forward only records each layer's (keys, values), returned here (filled by the forward)."""
        collected: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._target = ("collect", collected)
        return collected

    def decode(self, batch: int, columns: torch.Tensor, width: int) -> None:
        """The next forward decodes one token for rows [0, batch): row i's key goes to column ``columns[i]``,
        attention reads columns [0, width)."""
        self._target = ("decode", batch, columns, width)

    def move(self, source: list[int], destination: list[int]) -> None:
        """Copy rows ``source`` to rows ``destination`` (a leaving row's place taken by a running one)."""
        src = torch.tensor(source, device=self.device)
        dst = torch.tensor(destination, device=self.device)
        for buffers in (self.keys, self.values):
            for tensor in buffers:
                tensor.index_copy_(0, dst, tensor.index_select(0, src))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.shape[1]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._target is None:
            raise TunesmithError("SlotCache.update outside a prefill or decode step")
        mode, *target = self._target
        if mode == "collect":
            target[0].append((key_states, value_states))
            return key_states, value_states
        if self.like is None:
            self.like = (key_states.shape[1], key_states.shape[3], key_states.dtype)
            self.reserve(*self._wanted)
        if mode == "prefill":
            first, sources, prefix = target
            if prefix is not None:
                key_states = torch.cat([prefix[layer_idx][0], key_states], dim=2)
                value_states = torch.cat([prefix[layer_idx][1], value_states], dim=2)
            index = sources[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[3])
            rows = slice(first, first + sources.shape[0])
            self.keys[layer_idx][rows, :, :sources.shape[1]] = key_states.gather(2, index)
            self.values[layer_idx][rows, :, :sources.shape[1]] = value_states.gather(2, index)
            return key_states, value_states
        batch, columns, width = target
        rows = torch.arange(batch, device=self.device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[rows, :, columns] = key_states[:, :, 0]
        values[rows, :, columns] = value_states[:, :, 0]
        return keys[:batch, :, :width], values[:batch, :, :width]


def _rounded(n: int, block: int) -> int:
    return -(-n // block) * block
