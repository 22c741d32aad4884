"""Everything between raw text and the batches the trainer consumes.

    src = open_data(path, seq_len, tokenizer=None)     # built-in corpus, .txt, .bin or prepared folder
    stream = TrainStream(src.train, seed, micro, accum, rank, world, samples_consumed)
    x, y = stream.next_micro_batch()
    val = validation_batches(src.val, batch_size, n_batches, rank, world)

`python -m marjara.prepare` turns .txt/.jsonl into the train.bin/val.bin/meta.json folder.
"""

from marjara.data.datasets import MMapSliceDataset, TextDataset, TokenDataset
from marjara.data.sampler import GlobalSampler, TrainStream, validation_batches
from marjara.data.source import DataSource, open_data

__all__ = [
    "DataSource",
    "GlobalSampler",
    "MMapSliceDataset",
    "TextDataset",
    "TokenDataset",
    "TrainStream",
    "open_data",
    "validation_batches",
]
