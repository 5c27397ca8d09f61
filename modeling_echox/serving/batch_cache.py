"""The LLM's key/value cache for a batch whose rows come and go, each row left-padded to the batch's length."""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def check_batchable(cache: DynamicCache) -> None:
    """
    Raise `ValueError` unless every layer of `cache` is a plain `DynamicLayer` (full attention: the rows' keys and
    values can be padded and stacked); a sliding-window, quantized or offloaded cache cannot be re-batched this way.
    """
    kinds = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if kinds or not cache.layers:
        raise ValueError(
            "EchoXServer batches language models whose key/value cache holds full-attention layers only "
            f"(DynamicLayer); this one has {', '.join(kinds) or 'no layers'}."
        )


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class PaddedBatchCache:
    """
    One `DynamicCache` holding the keys and values of every row of the batch, each row left-padded to the longest, and
    the batch's attention mask `[B, T]` (0 on padding, and on whatever its own prompt masks). `add` appends a row
    from its own one-row cache, `remove` drops rows (and the padding no remaining row needs), `next_mask` grows the
    mask by the position each decoding step writes. The model's forward appends each step's keys and values to
    `cache` itself.
    """

    def __init__(self):
        self.cache: DynamicCache | None = None
        self.mask: torch.LongTensor | None = None
        self._padding: list[int] = []  # left padding of each row

    def __len__(self) -> int:
        return len(self._padding)

    def add(self, cache: DynamicCache, mask: torch.LongTensor) -> None:
        """Append a row: its one-row cache (plain `DynamicLayer`s, see `check_batchable`) and its mask `[1, T_row]`."""
        check_batchable(cache)
        length = mask.shape[1]
        if cache.get_seq_length() != length:
            raise ValueError(f"The row's cache holds {cache.get_seq_length()} positions but its mask {length}.")
        if self.cache is None:
            self.cache, self.mask, self._padding = cache, mask, [0]
            return
        width = max(self.mask.shape[1], length)
        for ours, theirs in zip(self.cache.layers, cache.layers, strict=True):
            ours.keys = torch.cat([_left_pad(ours.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            ours.values = torch.cat([_left_pad(ours.values, width, 2), _left_pad(theirs.values, width, 2)])
        grown = width - self.mask.shape[1]
        self._padding = [padding + grown for padding in self._padding] + [width - length]
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])

    def remove(self, rows: list[int]) -> None:
        """Drop the rows at these indices; the rest keep their order."""
        keep = [row for row in range(len(self)) if row not in set(rows)]
        if not keep:
            self.cache, self.mask, self._padding = None, None, []
            return
        cut = min(self._padding[row] for row in keep)
        index = torch.tensor(keep, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, cut:]
            layer.values = layer.values[index, :, cut:]
        self.mask = self.mask[index, cut:]
        self._padding = [self._padding[row] - cut for row in keep]

    def next_mask(self) -> torch.LongTensor:
        """The attention mask of the next decoding step (every row's new position is real); it is kept."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        return self.mask
