"""Length-grouped training order (--group_by_length): micro-batches of samples of similar length.

At num_crops 16 a sample is 300 to 2,600 tokens depending on its image's shape, and a micro-batch is
padded to its longest sample (3% of the tokens of a DocVQA-like mix at micro-batch 4, far more on data
whose lengths vary more, such as multi-image or text-only samples). Grouping shuffles the samples, cuts the
order into mega-batches of ``MEGABATCH_FACTOR`` micro-batches, sorts each by length and splits it into
micro-batches (as the HF Trainer's ``LengthGroupedSampler``), with the micro-batch that holds the longest
sample first, so a run that does not fit in memory fails at its first step. The order depends only on
(seed, epoch), so a resumed run, or one with a different number of dataloader workers, sees the same batches.

Lengths are the token counts that data validation computed from each sample's image sizes, so grouping
costs no extra decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

MEGABATCH_FACTOR = 50


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0) -> list[int]:
    """A permutation of range(len(lengths)) whose consecutive runs of ``batch_size`` have similar lengths."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return group_by_length(torch.randperm(len(lengths), generator=generator).tolist(), lengths, batch_size)


def group_by_length(order: Sequence[int], lengths: Sequence[int], batch_size: int) -> list[int]:
    """``order`` regrouped: each mega-batch sorted by length, the micro-batch with the longest sample first."""
    megabatch = MEGABATCH_FACTOR * batch_size
    batches = []
    for start in range(0, len(order), megabatch):
        chunk = sorted(order[start : start + megabatch], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    holder = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])  # each batch starts with its longest
    if len(batches[holder]) == len(batches[0]):
        batches[0], batches[holder] = batches[holder], batches[0]
    else:  # the short last batch: move only its longest sample, so every micro-batch keeps its size
        batches[0][0], batches[holder][0] = batches[holder][0], batches[0][0]
    return [index for batch in batches for index in batch]


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """``length_grouped_order`` as a sampler, for the epoch that ``epoch()`` gives when an epoch's iteration
    starts. The recipes pass the training dataset's epoch, which a callback sets at every epoch's start (on
    resume too): a resumed run on several processes wraps the sampler for skipping where accelerate's
    ``set_epoch`` does not reach it, and would otherwise replay the first epoch's order."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, epoch: Callable[[], int]):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed, self.epoch()))


def batched(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> list[list[int]]:
    """The lengths of the micro-batches that ``order`` makes."""
    return [[lengths[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


def padding_share(batches: Sequence[Sequence[int]]) -> float:
    """Pad tokens over all tokens when each batch (a list of lengths) is padded to its longest."""
    padded = sum(len(batch) * max(batch) for batch in batches)
    return 1 - sum(sum(batch) for batch in batches) / padded
