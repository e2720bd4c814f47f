import numpy as np
import pytest
import torch

from conftest import prepared_synthetic
from train.data.stream import vocabulary, eval_batches, mixed_batches, train_batches, train_example


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return prepared_synthetic(tmp_path_factory.mktemp("prep"), n_users=120, shard_samples=40)


def test_train_example_trims_pads_and_masks_other_domain():
    m = {"domains": [{"name": "A", "offset": 0, "n_items": 10}, {"name": "B", "offset": 10, "n_items": 10}]}
    dom = vocabulary(m)
    ex = train_example({"user": 3, "items": [1, 11, 2, 12, 13, 3]}, dom=dom, label_domain=1, max_len=4,
                       only_domain=False)
    # last max_len + 1 = 5 events: [11, 2, 12, 13, 3]; inputs [11, 2, 12, 13], targets [2, 12, 13, 3]
    assert ex["items"].tolist() == [11, 2, 12, 13]
    assert ex["targets"].tolist() == [0, 12, 13, 0]  # only domain-B targets keep a loss
    only = train_example({"user": 3, "items": [1, 11, 2, 12, 13, 3]}, dom=dom, label_domain=1, max_len=4,
                         only_domain=True)
    assert only["items"].tolist() == [0, 0, 11, 12] and only["targets"].tolist() == [0, 0, 12, 13]
    a = train_example({"user": 3, "items": [1, 2, 11]}, dom=dom, label_domain=0, max_len=4, only_domain=False)
    assert a["items"].tolist() == [0, 0, 1, 2] and a["targets"].tolist() == [0, 0, 2, 0]
    # no target of the domain in the window: the row stays, with nothing to predict (no loss)
    empty = train_example({"user": 3, "items": [11, 1]}, dom=dom, label_domain=1, max_len=4, only_domain=False)
    assert empty["items"].tolist() == [0, 0, 0, 11] and not empty["targets"].any()


def test_latest_target_false_keeps_a_rows_latest_event_as_an_input_only():
    """train.latest_target=false: the target of the row's latest event (after the reduction to
    the domain) is dropped; the inputs and every other target stay."""
    m = {"domains": [{"name": "A", "offset": 0, "n_items": 10}, {"name": "B", "offset": 10, "n_items": 10}]}
    dom = vocabulary(m)
    cases = (  # (label domain, only_domain, items, targets by default, targets without the latest)
        (1, False, [1, 11, 2, 12], [11, 0, 12, 13], [11, 0, 12, 0]),  # the mixed row: 13 is the latest event
        (1, True, [0, 0, 11, 12], [0, 0, 12, 13], [0, 0, 12, 0]),  # reduced to B: [11, 12, 13]
        (0, False, [1, 11, 2, 12], [0, 2, 0, 0], [0, 2, 0, 0]),  # an A row: its latest event is B's, no target
    )
    for label, only, items, targets, held in cases:
        kw = dict(dom=dom, label_domain=label, max_len=4, only_domain=only)
        sample = {"user": 3, "items": [1, 11, 2, 12, 13]}
        default, without = train_example(sample, **kw), train_example(sample, **kw, latest_target=False)
        assert default["items"].tolist() == without["items"].tolist() == items
        assert default["targets"].tolist() == targets and without["targets"].tolist() == held


def test_mixed_batches_hold_the_configured_ratio(synth):
    m, folder = synth
    dom = vocabulary(m)
    batches = list(mixed_batches(m, folder, source="A", target="B", batch_size=16, mix_ratio=0.25, max_len=12,
                                 seed=0, epoch=0, buffer=50))
    n_target_train = m["counts"]["B"]["train"]["samples"]
    assert sum(len(b["user"]) for b in batches) > n_target_train  # source rows come on top of one target pass
    for b in batches[:-1]:
        t = b["targets"]
        rows_a = ((t > 0) & (torch.from_numpy(dom.of_ids(t.numpy())) == 0)).any(1)
        rows_b = ((t > 0) & (torch.from_numpy(dom.of_ids(t.numpy())) == 1)).any(1)
        assert rows_a.sum() == 4 and rows_b.sum() == 12 and not (rows_a & rows_b).any()


def test_epochs_are_shuffled_differently_and_reproducibly(synth):
    m, folder = synth
    order = lambda ep: torch.cat([b["user"] for b in train_batches(m, folder, "A", batch_size=32, max_len=12,
                                                                      seed=1, epoch=ep, buffer=50)]).tolist()
    e0, e0b, e1 = order(0), order(0), order(1)
    assert e0 == e0b and e0 != e1 and sorted(e0) == sorted(e1)


def test_eval_batches_cover_every_user_of_the_domain_once(synth):
    m, folder = synth
    users = np.concatenate([b["user"].numpy() for d in ("A", "B")
                            for b in eval_batches(m, folder, d, "test", batch_size=25, max_len=12)])
    assert sorted(users.tolist()) == list(range(m["n_users"]))


def test_chunked_batches_equal_one_sample_at_a_time(synth):
    """The batch stage computes rows a chunk at a time and carries leftovers: the same rows, in the
    same order, as train_example on each sample of the same stream, in full batches."""
    from train.data.stream import sample_stream, shard_sizes, shard_urls

    m, folder = synth
    dom = vocabulary(m)
    for only in (False, True):
        kw = dict(dom=dom, label_domain=1, max_len=6, only_domain=only)
        stream = sample_stream(shard_urls(m, folder, "B", "train"), shuffle=True, seed=4, epoch=2, buffer=30,
                               n_items=dom.n_items, sizes=shard_sizes(m, "B", "train"))
        ref = [train_example(s, **kw) for s in stream]
        batches = list(train_batches(m, folder, "B", batch_size=7, max_len=6, seed=4, epoch=2, buffer=30,
                                     only_domain=only))
        assert all(len(b["user"]) == 7 for b in batches[:-1]) and 0 < len(batches[-1]["user"]) <= 7
        for key in ("items", "targets", "user"):
            got = torch.cat([b[key] for b in batches]).numpy()
            assert np.array_equal(got, np.stack([e[key] for e in ref])), key


@pytest.mark.parametrize("world, workers, shard_samples", [(1, 0, 40), (2, 0, 40), (2, 0, 200), (3, 2, 40),
                                                           (2, 2, 1000)])
def test_batches_per_rank_from_the_manifest_match_the_stream(tmp_path, monkeypatch, world, workers, shard_samples):
    """Each rank's batch count of an epoch, from the manifest alone, is what its stream yields:
    whole shards per reader, or (fewer shards than readers) every R-th sample."""
    from train.data.stream import ReaderOptions, batches_per_rank, split_mode
    m, folder = prepared_synthetic(tmp_path, n_users=150, shard_samples=shard_samples)
    n_shards = len(m["shards"]["B"]["train"])
    for epoch in (0, 3):
        want = batches_per_rank(m, "B", batch_size=9, seed=2, epoch=epoch, world=world, num_workers=workers)
        got = []
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(world))
            got.append(sum(1 for _ in train_batches(m, folder, "B", batch_size=9, max_len=5, seed=2, epoch=epoch,
                                                    buffer=20, only_domain=True,
                                                    reader=ReaderOptions(num_workers=workers))))
        assert got == want, (epoch, split_mode(n_shards, workers))


def test_length_buckets_group_like_rows_trim_padding_and_keep_every_sample_once(synth):
    """train.length_buckets: the same samples and batch count per epoch as without buckets; each
    batch holds rows of like length, trimmed of padding columns; reproducible per (seed, epoch)."""
    m, folder = synth
    kw = dict(batch_size=8, max_len=12, seed=1, epoch=0, buffer=50)
    plain = list(train_batches(m, folder, "A", **kw))
    bucketed = list(train_batches(m, folder, "A", **kw, buckets=4))
    assert len(bucketed) == len(plain)
    users = lambda bs: sorted(u for b in bs for u in b["user"].tolist())
    assert users(bucketed) == users(plain)
    assert all(bool((b["items"] != 0).any(0)[0] | (b["targets"] != 0).any(0)[0]) for b in bucketed)  # no all-pad column
    assert sum(b["items"].shape[1] for b in bucketed) < sum(b["items"].shape[1] for b in plain)
    spread = lambda bs: float(np.mean([int(n.max() - n.min()) for n in ((b["items"] != 0).sum(1) for b in bs)]))
    assert spread(bucketed) < spread(plain)  # rows of like length train together
    again = list(train_batches(m, folder, "A", **kw, buckets=4))
    assert [b["user"].tolist() for b in again] == [b["user"].tolist() for b in bucketed]
    # every row's real columns are the padded row's: the same items and targets, right-aligned
    full = {u: (b["items"][r], b["targets"][r]) for b in plain for r, u in enumerate(b["user"].tolist())}
    for b in bucketed:
        for r, u in enumerate(b["user"].tolist()):
            w = b["items"].shape[1]
            assert torch.equal(full[u][0][-w:], b["items"][r]) and not full[u][0][:-w].any()
            assert torch.equal(full[u][1][-w:], b["targets"][r]) and not full[u][1][:-w].any()
    mixed = list(mixed_batches(m, folder, source="A", target="B", batch_size=16, mix_ratio=0.25, max_len=12, seed=0,
                               epoch=0, buffer=30, buckets=2))
    assert mixed and all(b["items"].shape == b["targets"].shape and b["items"].shape[0] <= 16 for b in mixed)
