"""Everything between raw text and the batches the trainer consumes.

    src = open_data(path, seq_len, tokenizer=None)     # built-in corpus, .txt, .bin, prepared folder,
                                                       # or a mixture: ["0.7", "data/web", "0.3", "data/code"]
    stream = TrainStream(src.train, seed, micro, accum, rank, world, samples_consumed)
    x, y = stream.next_micro_batch()
    for name, weight, dataset in src.validation_sets():  # one per source of a mixture
        val = validation_batches(dataset, batch_size, n_batches, rank, world)

`python -m marjara.prepare` turns .txt/.jsonl(.gz/.zst)/.parquet into the train.bin/val.bin/meta.json folder.
"""

from marjara.data.datasets import MMapSliceDataset, TextDataset, TokenDataset
from marjara.data.mixture import Mixture
from marjara.data.sampler import GlobalSampler, TrainStream, validation_batches
from marjara.data.source import DataSource, open_data

__all__ = [
    "DataSource",
    "GlobalSampler",
    "MMapSliceDataset",
    "Mixture",
    "TextDataset",
    "TokenDataset",
    "TrainStream",
    "open_data",
    "validation_batches",
]
