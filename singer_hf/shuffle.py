"""A streamed dataset's shuffle buffer that resumes exactly, with a state of a few kilobytes.

`datasets.IterableDataset.shuffle` fills a buffer of `buffer_size` examples, permutes it, yields half
and keeps half. Its state holds no buffer, so a resumed stream refills it with other examples (losing
or repeating some) and reads other data than the uninterrupted run once the buffer has cycled.
Saving the buffer instead would put `buffer_size` encoded images in every checkpoint, per DataLoader
worker (~1.1 GB for 10,000 ImageNet JPEGs).

:class:`ReplayShuffledExamplesIterable` runs the same algorithm, with one change: an example is
permuted at most `max_cycles` times, then it leaves the buffer. Its state is the stream positions the
buffer holds, the RNG's state, and the source's state at the start of each of the last `max_cycles`
fills. Resuming re-reads the source from the start of the fill that read the oldest buffered example, keeping
only the buffered positions (nothing is decoded): about (`max_cycles` + 1) / 2 buffers' worth of
encoded examples, never more than `max_cycles`.
"""

from __future__ import annotations

import logging
import time
from copy import deepcopy
from itertools import islice

import datasets
import numpy as np
from datasets.iterable_dataset import BufferShuffledExamplesIterable, _BaseExamplesIterable

logger = logging.getLogger(__name__)

MAX_BUFFER_CYCLES = 6
"""Permutations an example may stay in the buffer for (each keeps it with probability 1/2): what bounds a
resume's re-read, against how many examples leave earlier than uncapped (docs/training.md, "Resuming", has the figures)."""


def shuffle_stream(
    dataset: datasets.IterableDataset, seed: int, buffer_size: int, max_cycles: int = MAX_BUFFER_CYCLES
) -> datasets.IterableDataset:
    """`dataset.shuffle(seed=seed, buffer_size=buffer_size)` (shard order and all), its buffer resumable exactly."""
    shuffled = dataset.shuffle(seed=seed, buffer_size=buffer_size)
    buffer = shuffled._ex_iterable
    if not isinstance(buffer, BufferShuffledExamplesIterable):
        raise TypeError(f"datasets {datasets.__version__}: IterableDataset.shuffle built a {type(buffer).__name__}, not a buffer")
    return datasets.IterableDataset(
        ReplayShuffledExamplesIterable(buffer.ex_iterable, buffer.buffer_size, buffer.generator, max_cycles),
        info=shuffled.info,
        split=shuffled.split,
        formatting=shuffled._formatting,
        distributed=shuffled._distributed,
        token_per_repo_id=shuffled._token_per_repo_id,
    )


class ReplayShuffledExamplesIterable(_BaseExamplesIterable):
    """`datasets`' shuffle buffer (fill to `buffer_size`, permute, yield all but `buffer_size // 2`), each
    example kept for at most `max_cycles` permutations; its state is positions, not examples (see the module).

    The state, at any point between two yields (what the layers above snapshot):
    - `read`: examples read from the source so far;
    - `fills`: `[read index, source state]` at the start of each of the last `max_cycles` fills;
    - `buffer`: the read index of each example this cycle, in the permuted order: `buffer[:to_yield]`
      are yielded this cycle (`yielded` of them so far), `buffer[to_yield:]` stay for the next one;
    - `rng`: the generator's state after this cycle's permutation.
    """

    def __init__(self, ex_iterable: _BaseExamplesIterable, buffer_size: int, generator: np.random.Generator, max_cycles: int):
        super().__init__()
        if buffer_size < 1 or max_cycles < 1:
            raise ValueError(f"buffer_size and max_cycles must be >= 1, got {buffer_size} and {max_cycles}")
        self.ex_iterable, self.buffer_size, self.generator, self.max_cycles = ex_iterable, buffer_size, generator, max_cycles

    def _with(self, ex_iterable=None, generator=None) -> "ReplayShuffledExamplesIterable":
        return ReplayShuffledExamplesIterable(
            ex_iterable or self.ex_iterable, self.buffer_size, generator or self.generator, self.max_cycles
        )

    # -- what every examples iterable provides: passed to the source, as datasets' buffer does ------------
    def shift_rngs(self, value: int) -> "ReplayShuffledExamplesIterable":
        """Another generator per DataLoader worker and per epoch, derived as datasets' buffer derives it."""
        seed = deepcopy(self.generator).integers(0, 1 << 63) - value
        return self._with(generator=np.random.default_rng(seed))

    def shuffle_data_sources(self, generator: np.random.Generator) -> "ReplayShuffledExamplesIterable":
        return self._with(ex_iterable=self.ex_iterable.shuffle_data_sources(generator))

    def shard_data_sources(self, num_shards: int, index: int, contiguous=True) -> "ReplayShuffledExamplesIterable":
        return self._with(ex_iterable=self.ex_iterable.shard_data_sources(num_shards, index, contiguous=contiguous))

    def reshard_data_sources(self) -> "ReplayShuffledExamplesIterable":
        return self._with(ex_iterable=self.ex_iterable.reshard_data_sources())

    @property
    def num_shards(self) -> int:
        return self.ex_iterable.num_shards

    @property
    def is_typed(self):
        return self.ex_iterable.is_typed

    @property
    def features(self):
        return self.ex_iterable.features

    # -- state ---------------------------------------------------------------------------------------
    def _init_state_dict(self) -> dict:
        self.ex_iterable._init_state_dict()
        # None, not []: datasets' nested loading copies a saved value over None, but not over a list of another length.
        self._state_dict = {
            "read": 0, "fills": None, "buffer": None, "yielded": 0, "to_yield": 0, "rng": None, "type": type(self).__name__,
        }  # fmt: skip
        return self._state_dict

    def load_state_dict(self, state_dict: dict) -> dict:
        self._init_state_dict()
        self._state_dict.update(deepcopy(state_dict))
        return self._state_dict

    def __iter__(self):
        state = self._state_dict if self._state_dict is not None else self._init_state_dict()
        rng = deepcopy(self.generator)
        if state["buffer"] is None:
            source, entries, fills = iter(self.ex_iterable), [], []
        else:
            rng.bit_generator.state = state["rng"]
            source, entries = self._replay(state)
            fills = state["fills"]
        while True:
            while state["yielded"] < state["to_yield"]:
                state["yielded"] += 1
                yield entries[state["yielded"] - 1][1]
            kept, read = entries[state["to_yield"] :], state["read"]
            fills = [*fills, [read, self.ex_iterable.state_dict()]][-self.max_cycles :]
            new = enumerate(islice(source, self.buffer_size - len(kept)), start=read)
            entries = kept + list(new)
            read += len(entries) - len(kept)
            if not entries:
                return
            entries = [entries[i] for i in rng.permutation(len(entries))]
            if len(entries) < self.buffer_size:  # the source is exhausted: everything goes
                to_yield = len(entries)
            else:
                split, earliest = len(entries) - self.buffer_size // 2, self._earliest_keepable(fills, read)
                stay = [entry for entry in entries[split:] if entry[0] >= earliest]
                entries = entries[:split] + [entry for entry in entries[split:] if entry[0] < earliest] + stay
                to_yield = len(entries) - len(stay)
            state.update(
                read=read, fills=fills, buffer=[index for index, _ in entries], yielded=0, to_yield=to_yield,
                rng=rng.bit_generator.state,
            )  # fmt: skip

    def _earliest_keepable(self, fills: list, read: int) -> int:
        """The first read index that may stay for another cycle: examples read before it have been permuted `max_cycles` times."""
        if len(fills) < self.max_cycles:
            return 0
        return fills[1 - self.max_cycles][0] if self.max_cycles > 1 else read

    def _replay(self, state: dict) -> tuple:
        """The source, positioned at `read`, and this cycle's entries (those still to come), rebuilt by re-reading
        from the last fill that began at or before the oldest of them."""
        wanted = {index: slot for slot, index in enumerate(state["buffer"]) if slot >= state["yielded"]}
        oldest = min(wanted, default=state["read"])
        start, source_state = [fill for fill in state["fills"] if fill[0] <= oldest][-1]
        self.ex_iterable.load_state_dict(source_state)
        source = iter(self.ex_iterable)
        entries: list = [None] * len(state["buffer"])
        began = time.perf_counter()
        for index in range(start, state["read"]):
            example = next(source, None)
            if example is None:
                raise RuntimeError(
                    f"resuming the shuffle buffer: the stream ended after {index} examples, but {state['read']} had been "
                    "read before the checkpoint; the dataset changed since"
                )
            if index in wanted:
                entries[wanted[index]] = (index, example)
        seconds = time.perf_counter() - began
        logger.info("Shuffle buffer rebuilt: %d examples re-read (%d kept) in %.1f s", state["read"] - start, len(wanted), seconds)
        return source, entries
