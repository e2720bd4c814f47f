import json
import math

import numpy as np
import pytest
import torch

from train.evaluate import matrix_score_fn, metrics_from_ranks, ranks_of_targets, sample_negatives


def test_metrics_against_hand_computed_ranks():
    ranks = np.array([1, 3, 11, 20])
    m = metrics_from_ranks(ranks, [5, 10, 20])
    assert m["hr@5"] == pytest.approx(2 / 4)
    assert m["hr@10"] == pytest.approx(2 / 4)
    assert m["hr@20"] == pytest.approx(4 / 4)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(4)) / 4)
    assert m["ndcg@20"] == pytest.approx((1 + 0.5 + 1 / math.log2(12) + 1 / math.log2(21)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 20) / 4)


def test_ranks_full_and_sampled_with_ties_against_target():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5, 0.2],
                           [1.0, 1.0, 1.0, 1.0, 1.0]])
    target = torch.tensor([2, 0])
    assert ranks_of_targets(scores, target).tolist() == [3, 5]  # tie with col 3 counts against
    negs = torch.tensor([[0, 4], [1, 2]])
    assert ranks_of_targets(scores, target, negs).tolist() == [1, 3]


def test_negatives_exclude_user_items_are_distinct_and_deterministic():
    exclude = np.array([3, 5, 7, 101])  # 101 is outside the domain (offset 0, 100 items)
    a = sample_negatives(n_items=100, offset=0, exclude=exclude, k=90, seed=1, split=1, user=7)
    b = sample_negatives(n_items=100, offset=0, exclude=exclude, k=90, seed=1, split=1, user=7)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 90
    assert not set(a.tolist()) & {3, 5, 7} and a.min() >= 1 and a.max() <= 100
    c = sample_negatives(n_items=100, offset=0, exclude=exclude, k=90, seed=1, split=1, user=8)
    assert not np.array_equal(a, c)


def test_too_few_negatives_is_an_error():
    with pytest.raises(ValueError, match="fewer than eval.num_negatives"):
        sample_negatives(n_items=10, offset=50, exclude=np.arange(51, 56), k=6, seed=0, split=0, user=1)


def test_history_buckets_and_paired_bootstrap():
    from train.evaluate import history_buckets, ndcg_at, paired_bootstrap

    assert history_buckets([5, 10]) == [("0", 0, 0), ("1-5", 1, 5), ("6-10", 6, 10), (">10", 11, float("inf"))]
    assert ndcg_at(np.array([1, 3, 11]), 10).round(4).tolist() == [1.0, 0.5, 0.0]
    rng = np.random.default_rng(0)
    b = rng.random(2000)
    same = paired_bootstrap(b, b, resamples=200, seed=1)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and same["share_le_0"] == 1.0
    shifted = paired_bootstrap(b + 0.05 + rng.normal(0, 0.2, 2000), b, resamples=500, seed=1)
    lo, hi = shifted["ci95"]
    assert 0 < lo < 0.05 < hi and hi - lo < 0.05 and shifted["share_le_0"] == 0.0
    # paired: a large shared per-user spread does not widen the interval of the difference
    spread = rng.normal(0, 5, 2000)
    paired = paired_bootstrap(b + spread + 0.05, b + spread, resamples=500, seed=1)
    assert paired["ci95"][1] - paired["ci95"][0] < 1e-9
    assert paired_bootstrap(b, b + 0.01, resamples=100, seed=3) == paired_bootstrap(b, b + 0.01, resamples=100, seed=3)


def _shard_samples(folder, split):
    import json
    import tarfile
    from pathlib import Path
    for tar in sorted(Path(folder).glob(f"*/{split}-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    yield json.load(t.extractfile(m))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from conftest import prepared_synthetic
    return prepared_synthetic(tmp_path_factory.mktemp("prep"), n_users=60, shard_samples=25)


def test_observed_counts_are_every_users_events_before_the_split_target(prepared):
    from train.evaluate import observed_counts
    manifest, folder = prepared
    n = sum(d["n_items"] for d in manifest["domains"]) + 1
    # read from the train shards instead: a user's train samples hold its events but the last two
    train = {s["user"]: s["items"] for s in _shard_samples(folder, "train")}
    assert len(train) == manifest["n_users"]
    before_valid = np.bincount(np.concatenate([np.asarray(v) for v in train.values()]), minlength=n)
    valid_targets = np.bincount([s["target"] for s in _shard_samples(folder, "valid")], minlength=n)
    assert np.array_equal(observed_counts(manifest, folder, "valid"), before_valid)
    assert np.array_equal(observed_counts(manifest, folder, "test"), before_valid + valid_targets)


def test_the_prior_adds_its_weight_times_log_count_to_the_scores_only_when_asked(prepared):
    from train.config import EvalConfig
    from train.data.stream import eval_batches
    from train.evaluate import Evaluator, observed_counts
    manifest, folder = prepared
    d = manifest["domains"][1]
    lo, k = d["offset"] + 1, 20
    ev = Evaluator(manifest, folder, EvalConfig(num_negatives=k, prior=0.7, exclude_history=False), max_len=20)
    ramp = 0.3 * (np.arange(d["n_items"]) % 7)  # model scores on the scale of the prior, so its weight matters
    score_fn = matrix_score_fn(lambda items, dom: torch.from_numpy(np.tile(ramp, (items.shape[0], 1))))
    total = ramp + 0.7 * np.log1p(observed_counts(manifest, folder, "test"))[lo:lo + d["n_items"]]
    want_full, want_sampled, want_unseen, users, targets = [], [], [], [], []
    for b in eval_batches(manifest, folder, d["name"], "test", batch_size=512, max_len=20):
        t = (b["target"] - lo).numpy()
        negs = ev._negs(d["name"], "test", b["user"], b["exclude"]) - lo
        for r in range(len(t)):  # ties count against the target (the full count includes it)
            want_full.append(int((total >= total[t[r]]).sum()))
            want_sampled.append(1 + int((total[negs[r]] >= total[t[r]]).sum()))
            seen = np.setdiff1d(b["history"][r][(b["history"][r] >= lo) & (b["history"][r] < lo + d["n_items"])] - lo,
                                [t[r]])  # the user's items of the domain but the target
            want_unseen.append(want_full[-1] - int((total[seen] >= total[t[r]]).sum()))
        users += b["user"].tolist()
        targets += t.tolist()
    order = np.argsort(users, kind="stable")
    got = ev.ranks(score_fn, d["name"], "test", only_domain=False, device="cpu")
    assert np.array_equal(got["full"], np.array(want_full)[order])
    assert np.array_equal(got["sampled999"], np.array(want_sampled)[order])
    raw = ev.ranks(score_fn, d["name"], "test", only_domain=False, device="cpu", eval_terms=False)
    want_raw = np.array([int((ramp >= ramp[t]).sum()) for t in targets])[order]  # the model's scores alone
    assert np.array_equal(raw["full"], want_raw) and not np.array_equal(want_raw, got["full"])
    # eval.exclude_history (the default): the user's own items leave the full ranking's candidates
    unseen = Evaluator(manifest, folder, EvalConfig(num_negatives=k, prior=0.7), max_len=20)
    got = unseen.ranks(score_fn, d["name"], "test", only_domain=False, device="cpu")
    assert np.array_equal(got["full"], np.array(want_unseen)[order]) and (got["full"] < np.array(want_full)[order]).any()
    assert np.array_equal(got["sampled999"], np.array(want_sampled)[order])  # the sampled protocol excludes them anyway


def _hand_transitions(manifest, folder, split):
    """Counter of (j, i) pairs, i right after j among a user's events of one domain, read from the
    train shards (events but the last two) plus, for test, the valid target (the next event)."""
    from collections import Counter
    ends = np.cumsum([d["n_items"] for d in manifest["domains"]])
    seqs = {s["user"]: list(s["items"]) for s in _shard_samples(folder, "train")}
    if split == "test":
        for s in _shard_samples(folder, "valid"):
            seqs[s["user"]].append(s["target"])
    pairs = Counter()
    for seq in seqs.values():
        last = {}
        for i in seq:
            d = int(np.searchsorted(ends, i))
            if d in last:
                pairs[last[d], i] += 1
            last[d] = i
    return pairs


@pytest.mark.parametrize("split", ["valid", "test"])
def test_observed_transitions_count_next_items_within_a_domain_before_the_split_target(prepared, split):
    from train.evaluate import observed_transitions
    manifest, folder = prepared
    want = _hand_transitions(manifest, folder, split)
    got = observed_transitions(manifest, folder, split)
    assert len(want) > 50 and max(want.values()) > 1  # the check covers repeated pairs
    assert all(got.count(j, i) == c for (j, i), c in want.items())
    assert int(got.counts.sum()) == sum(want.values())  # and no pair beyond them


def test_last_of_domain_skips_other_domains_and_padding():
    from train.evaluate import last_of_domain
    items = torch.tensor([[0, 3, 12, 5, 14],   # domain = ids 1..10: last is 5
                          [0, 0, 0, 11, 12],   # none of the domain
                          [7, 2, 9, 1, 10]])
    assert last_of_domain(items, 0, 10).tolist() == [5, 0, 10]
    assert last_of_domain(items, 10, 5).tolist() == [14, 12, 0]


def test_the_transition_term_adds_its_weight_times_log_count_from_the_last_item_of_the_domain(prepared):
    from train.config import EvalConfig
    from train.data.stream import eval_batches
    from train.evaluate import Evaluator
    manifest, folder = prepared
    d = manifest["domains"][0]
    lo, k = d["offset"] + 1, 20
    pairs = _hand_transitions(manifest, folder, "test")
    ev = Evaluator(manifest, folder, EvalConfig(num_negatives=k, transition=0.9), max_len=20)
    ramp = 0.3 * (np.arange(d["n_items"]) % 7)
    score_fn = matrix_score_fn(lambda items, dom: torch.from_numpy(np.tile(ramp, (items.shape[0], 1))))
    want, ramp_only, users = [], [], []
    for b in eval_batches(manifest, folder, d["name"], "test", batch_size=512, max_len=20):
        t = (b["target"] - lo).numpy()
        negs = ev._negs(d["name"], "test", b["user"], b["exclude"]) - lo
        for r, row in enumerate(b["items"].tolist()):
            mine = [i for i in row if lo <= i < lo + d["n_items"]]
            total = ramp + 0.9 * np.log1p([pairs[mine[-1], lo + c] if mine else 0 for c in range(d["n_items"])])
            want.append(1 + int((total[negs[r]] >= total[t[r]]).sum()))
            ramp_only.append(1 + int((ramp[negs[r]] >= ramp[t[r]]).sum()))
        users += b["user"].tolist()
    order = np.argsort(users, kind="stable")
    got = ev.ranks(score_fn, d["name"], "test", only_domain=False, device="cpu")
    assert np.array_equal(got["sampled999"], np.array(want)[order])
    assert not np.array_equal(got["sampled999"], np.array(ramp_only)[order])  # the term moved ranks
    alone = ev.ranks(score_fn, d["name"], "test", only_domain=False, device="cpu", eval_terms=False)
    assert np.array_equal(alone["sampled999"], np.array(ramp_only)[order])


def test_nan_scores_rank_the_target_last_and_evaluation_refuses_them(prepared):
    """A NaN target score must never rank first (a diverged model reported as perfect); the
    evaluator refuses non-finite scores outright."""
    from train.config import EvalConfig
    from train.evaluate import Evaluator, NonFiniteScores
    scores = torch.tensor([[float("nan"), 0.2, 0.3], [0.5, float("nan"), 0.1]])
    assert ranks_of_targets(scores, torch.tensor([0, 0])).tolist() == [3, 2]  # a NaN counts against the target
    assert ranks_of_targets(scores, torch.tensor([0, 0]), torch.tensor([[1, 2], [1, 2]])).tolist() == [3, 2]
    manifest, folder = prepared
    ev = Evaluator(manifest, folder, EvalConfig(num_negatives=5, batch_size=16), max_len=10)
    n = manifest["domains"][0]["n_items"]
    finite = ev.evaluate(matrix_score_fn(lambda items, d: torch.zeros(len(items), n)), "A", "valid", only_domain=False,
                         device="cpu")
    assert finite["full"]["hr@10"] == 0.0  # a constant scorer ranks every target last, not first

    def diverged(items, d):
        s = torch.zeros(len(items), n)
        s[-1, 3] = float("inf")
        return s
    with pytest.raises(NonFiniteScores, match="evaluating A valid: the model's scores are not finite"):
        ev.evaluate(matrix_score_fn(diverged), "A", "valid", only_domain=False, device="cpu")


def test_records_are_strict_json_naming_a_non_finite_key():
    from train.files import NonFiniteValue, finite_json
    assert json.loads(finite_json({"a": [1.0, {"b": 2}]}, what="x")) == {"a": [1.0, {"b": 2}]}
    with pytest.raises(NonFiniteValue, match=r"metrics.json: joint.test.B.full.ndcg@10 is not a finite number"):
        finite_json({"joint": {"test": {"B": {"full": {"ndcg@10": float("inf")}}}}}, what="metrics.json")


@pytest.mark.parametrize("temperature, bias", [(0.0, False), (0.1, True)])
def test_chunked_full_ranking_equals_scoring_every_item_at_once(temperature, bias):
    """A model's scorer, 7 items at a time, ranks every target exactly as the whole [B, n] score
    matrix does (ties against the target), for both protocols."""
    from model import ModelConfig, Vocabulary, build_recommender
    from train.evaluate import rank_in_chunks
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, ff_mult=2, dropout=0.0, emb_dropout=0.0, max_len=8,
                      temperature=temperature, item_bias=bias)
    m = build_recommender(cfg, Vocabulary(("A", "B"), (40, 50))).eval()
    if bias:
        with torch.no_grad():
            m.item_bias.copy_(torch.randn(91))
    items = torch.randint(1, 91, (33, 8))
    target = torch.randint(0, 50, (33,))
    target[:3] = torch.tensor([0, 49, 7])  # the first and last items of the domain
    negs = torch.stack([torch.randperm(50)[:20] for _ in range(33)])
    with torch.no_grad():
        scores = m(items, domain=1)
        want_full, want_sampled = ranks_of_targets(scores, target), ranks_of_targets(scores, target, negs)
        for chunk in (1, 7, 50, 1000):
            full, sampled, bad = m(items, domain=1, consume=lambda s: rank_in_chunks(s, target, negs, None, chunk))
            assert torch.equal(full, want_full) and torch.equal(sampled, want_sampled) and bad == 0, chunk
    # ties count against the target however the items are split
    tied = torch.zeros(2, 10)
    from train.evaluate import MatrixScorer
    full, sampled, _ = rank_in_chunks(MatrixScorer(tied), torch.tensor([0, 9]), torch.tensor([[1, 2], [3, 4]]), None, 3)
    assert full.tolist() == [10, 10] and sampled.tolist() == [3, 3]


def test_the_evaluator_ranks_the_same_in_small_item_chunks_with_both_eval_terms(prepared):
    from train.config import EvalConfig
    from train.evaluate import Evaluator
    manifest, folder = prepared
    n = manifest["domains"][1]["n_items"]
    torch.manual_seed(3)
    table = torch.randn(n)
    score_fn = matrix_score_fn(lambda items, d: table[None].repeat(len(items), 1) + items[:, -1:].float() / 100)
    base = dict(num_negatives=10, prior=0.5, transition=1.0)
    one = Evaluator(manifest, folder, EvalConfig(**base, item_chunk=10 ** 6), max_len=10)
    many = Evaluator(manifest, folder, EvalConfig(**base, item_chunk=3), max_len=10)
    a = one.ranks(score_fn, "B", "test", only_domain=False, device="cpu")
    b = many.ranks(score_fn, "B", "test", only_domain=False, device="cpu")
    assert all(np.array_equal(a[k], b[k]) for k in a) and a["full"].max() > 1


def test_without_takes_the_latest_event_or_the_other_domains_out_of_left_padded_rows():
    from train.evaluate import without

    rows = torch.tensor([[0, 0, 3, 12, 4, 15], [1, 11, 12, 2, 13, 14]])  # domain 1: ids 11..20
    assert without(rows, "last-event", 10, 10).tolist() == [[0, 0, 0, 3, 12, 4], [0, 1, 11, 12, 2, 13]]
    assert without(rows, "other-domains", 10, 10).tolist() == [[0, 0, 0, 0, 12, 15], [0, 0, 11, 12, 13, 14]]
    assert without(rows, "other-domains", 0, 10).tolist() == [[0, 0, 0, 0, 3, 4], [0, 0, 0, 0, 1, 2]]
    with pytest.raises(ValueError, match="last-event, other-domains"):
        without(rows, "first-event", 0, 10)
