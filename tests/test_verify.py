"""Checkpoint manifests: every file's size and xxh3_64, and the first damage found named."""

import os

import pytest

from marjara.checkpoint.verify import _share, build_manifest, digest_file, find_damage


@pytest.fixture
def tag_dir(tmp_path):
    tag = tmp_path / "global_step10"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(os.urandom(3 * (1 << 20) + 17))
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(1000))
    (tag / "marjara.json").write_text("{}")
    return tag


def test_digest_is_xxh3_of_the_whole_file(tag_dir):
    import xxhash

    path = tag_dir / "mp_rank_00_model_states.pt"
    assert digest_file(path) == xxhash.xxh3_64_intdigest(path.read_bytes())


def test_an_intact_tag_passes_and_the_meta_file_is_not_listed(tag_dir):
    manifest = build_manifest(tag_dir)
    assert sorted(manifest["files"]) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert find_damage(tag_dir, manifest) is None


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.unlink(), "is missing"),
    (lambda p: p.write_bytes(p.read_bytes()[:-5]), "bytes, 3145745 were saved (truncated or replaced)"),
    (lambda p: p.write_bytes(p.read_bytes()[:4096] + os.urandom(4096) + p.read_bytes()[8192:]),
     "does not match its xxh3_64 checksum"),
])
def test_damage_names_the_file(tag_dir, damage, expected):
    manifest = build_manifest(tag_dir)
    damage(tag_dir / "mp_rank_00_model_states.pt")
    problem = find_damage(tag_dir, manifest)
    assert problem.startswith("mp_rank_00_model_states.pt ") and expected in problem


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_each_file_is_hashed_by_exactly_one_rank(world):
    sizes = [5, 100, 7, 7, 3000, 1, 0, 64]
    shares = [_share(sizes, rank, world) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    if world == 2:  # the big file alone on one rank, everything else on the other
        assert [4] in shares
