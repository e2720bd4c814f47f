import math

import pytest
import torch

from model import ModelConfig, Vocabulary, build_recommender, domain_cross_entropy, weighted_domain_mean

VOCAB = Vocabulary(("A", "B"), (3, 4))  # ids 1-3 domain 0 (A), 4-7 domain 1 (B)
SMALL = dict(d_model=8, n_layers=1, n_heads=2, ff_mult=2, dropout=0.0, emb_dropout=0.0, max_len=6, domain_heads=False)


def make(seed=0, active=None, **kw):
    """A small model (8 dims, no dropout) from ModelConfig fields ``kw``, built after seeding."""
    torch.manual_seed(seed)
    return build_recommender(ModelConfig(**{**SMALL, **kw}), VOCAB, active=active)


def _model(causal=True, seed=0):
    return make(seed, n_layers=2, causal=causal, objective="next_item" if causal else "masked").eval()


def test_causal_mask_future_item_does_not_change_earlier_outputs():
    m = _model()
    a = torch.tensor([[0, 0, 1, 5, 2, 6]])
    b = a.clone()
    b[0, 4:] = torch.tensor([7, 3])  # change the future of position 3
    ha, hb = m(a), m(b)
    assert torch.allclose(ha[:, :4], hb[:, :4], atol=1e-6)
    assert not torch.allclose(ha[:, 4:], hb[:, 4:], atol=1e-4)


def test_bidirectional_model_does_see_the_future():
    m = _model(causal=False)
    a = torch.tensor([[0, 0, 1, 5, 2, 6]])
    b = a.clone()
    b[0, 5] = 3
    assert not torch.allclose(m(a)[:, 3], m(b)[:, 3], atol=1e-4)


def test_padding_positions_are_invisible():
    """Whatever sits in padded slots (here: noisy position embeddings) never reaches real outputs."""
    m = _model()
    items = torch.tensor([[0, 0, 1, 5, 2, 6]])
    before = m(items)[:, 2:]
    with torch.no_grad():
        m.embedding.position.weight[:2] += 5 * torch.randn(2, 8)
    assert torch.allclose(m(items)[:, 2:], before, atol=1e-6)
    assert torch.isfinite(m(torch.zeros(2, 6, dtype=torch.long))).all()  # all-padding rows: no NaN


def test_loss_matches_hand_computation():
    h = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]]])  # (B=1, L=3, D=2)
    table = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 1.0], [3.0, 0.0], [1.0, 1.0]])
    targets = torch.tensor([[1, 0, 4]])  # pos 0 -> item 1 (domain 0), pos 2 -> item 4 (domain 1)
    loss, sums, counts = domain_cross_entropy(h, targets, table, [(1, 3), (3, 5)], [0.3, 0.7])
    # domain 0 softmax over items 1,2 at h0=(1,0): logits (1, 0)
    ce0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(0)))
    # domain 1 softmax over items 3,4 at h2=(0,2): logits (0, 2), target item 4
    ce1 = -math.log(math.exp(2) / (math.exp(0) + math.exp(2)))
    assert counts == [1, 1]
    assert math.isclose(loss.item(), 0.3 * ce0 + 0.7 * ce1, rel_tol=1e-6)
    assert math.isclose(sums[0].item(), ce0, rel_tol=1e-6) and math.isclose(sums[1].item(), ce1, rel_tol=1e-6)


def test_loss_is_a_mean_per_domain_not_per_batch():
    h = torch.randn(2, 4, 8)
    table = torch.randn(8, 8)
    t = torch.tensor([[1, 2, 3, 4], [5, 0, 0, 6]])  # 3 targets in domain 0, 3 in domain 1
    loss, sums, counts = domain_cross_entropy(h, t, table, [(1, 4), (4, 8)], [1.0, 2.0])
    assert counts == [3, 3]
    assert torch.isclose(loss, sums[0] / 3 + 2.0 * sums[1] / 3)


def test_empty_domain_adds_zero_but_keeps_gradient_path():
    m = _model()
    items = torch.tensor([[0, 1, 2, 3]])
    targets = torch.tensor([[0, 2, 3, 1]])  # domain-0 targets only
    sums, counts = m(items, targets=targets)
    assert counts.tolist() == [3, 0] and sums[1].item() == 0.0
    weighted_domain_mean(sums, counts, [1.0, 1.0]).backward()
    assert m.embedding.item.weight.grad is not None


def test_scores_and_recommend_cover_one_domain():
    m = _model()
    items = torch.tensor([[0, 0, 1, 5, 2, 6]])
    s = m(items, domain=1)
    assert s.shape == (1, 4)
    top, scores = m.recommend(items, domain=1, k=2, exclude_history=False)
    assert ((top >= 4) & (top <= 7)).all()
    assert torch.equal(top[0, 0], s.argmax(1)[0] + 4) and torch.equal(scores[0], s[0].topk(2).values)
    fresh, _ = m.recommend(items, domain=1, k=4)  # 5 and 6 are in the history: the other two of 4..7
    assert sorted(fresh[0].tolist()) == [4, 7]
    order = s[0, [0, 3]].argsort(descending=True)
    assert fresh[0].tolist() == torch.tensor([4, 7])[order].tolist()


def _headed(seed=0):
    return make(seed, domain_heads=True).eval()


def test_domain_heads_start_as_the_shared_query_then_specialise():
    m = _headed()
    items = torch.tensor([[0, 0, 1, 5, 2, 6]])
    h = m(items)[:, -1]
    assert torch.allclose(m(items, domain=1), h @ m.embedding.item.weight[4:8].T, atol=1e-6)
    with torch.no_grad():
        m.heads[1].weight.normal_()
    assert not torch.allclose(m(items, domain=1), h @ m.embedding.item.weight[4:8].T, atol=1e-3)
    assert torch.allclose(m(items, domain=0), h @ m.embedding.item.weight[1:4].T, atol=1e-6)


def test_every_head_takes_part_even_when_one_domain_has_no_targets():
    m = _headed().train()
    sums, counts = m(torch.tensor([[0, 1, 2, 3]]), targets=torch.tensor([[0, 2, 3, 1]]))
    weighted_domain_mean(sums, counts, [1.0, 1.0]).backward()
    assert counts.tolist() == [3, 0]
    assert m.heads[0].weight.grad.abs().sum() > 0 and m.heads[1].weight.grad is not None


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    items = torch.tensor([[0, 1, 5, 2, 6, 3], [1, 2, 3, 5, 6, 7]])
    targets = torch.tensor([[0, 5, 2, 6, 3, 4], [2, 3, 5, 6, 7, 1]])
    grads = []
    for ckpt in (False, True):
        m = _headed().train()  # dropout is 0: both passes see the same function
        m.encoder.checkpoint_blocks = ckpt
        sums, counts = m(items, targets=targets)
        loss = weighted_domain_mean(sums, counts, [1.0, 1.0])
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten() for p in m.parameters()])))
    assert grads[0][0] == grads[1][0] and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_sampled_softmax_equals_full_when_candidates_are_the_domain():
    from model.losses import domain_ce_sums, domain_sampled_ce_sums

    torch.manual_seed(0)
    table = torch.randn(9, 4)  # ids 1..4 domain 0, 5..8 domain 1
    ranges = [(1, 5), (5, 9)]
    hidden = torch.randn(1, 8, 4)
    targets = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])  # every item exactly once: Q = 1 for all
    full, n_full = domain_ce_sums(hidden, targets, table, ranges)
    samp, n_samp = domain_sampled_ce_sums(hidden, targets, table, ranges, num_sampled=0)
    assert torch.equal(n_full, n_samp)
    for a, b in zip(full, samp):
        assert torch.allclose(a, b, atol=1e-5)


def test_sampled_softmax_log_q_by_hand():
    from model.losses import domain_sampled_ce_sums

    torch.manual_seed(1)
    table = torch.randn(5, 3)  # one domain, ids 1..4
    hidden = torch.randn(1, 3, 3)
    targets = torch.tensor([[2, 2, 3]])  # candidates {2, 3}; 2 appears twice in the batch
    (s,), _ = domain_sampled_ce_sums(hidden, targets, table, [(1, 5)], num_sampled=0)
    logits = hidden[0] @ table[[2, 3]].T - torch.log(torch.tensor([2.0, 1.0]))
    ref = -(torch.log_softmax(logits, 1)[[0, 1, 2], [0, 0, 1]]).sum()
    assert torch.allclose(s, ref, atol=1e-5)
    # uniform draws add K / n_d to every candidate's expected count
    torch.manual_seed(5)
    (s2,), _ = domain_sampled_ce_sums(hidden, targets, table, [(1, 5)], num_sampled=8)
    torch.manual_seed(5)
    drawn = torch.randint(1, 5, (8,))
    cand = torch.unique(torch.cat([targets[0], drawn]))
    count = torch.tensor([float((targets[0] == c).sum()) for c in cand]) + 8 / 4
    logits = hidden[0] @ table[cand].T - torch.log(count)
    cols = torch.tensor([int((cand == t).nonzero()) for t in targets[0]])
    assert torch.allclose(s2, -(torch.log_softmax(logits, 1)[torch.arange(3), cols]).sum(), atol=1e-5)


def test_uniform_negatives_loss_by_hand():
    from model.losses import domain_uniform_ce_sums

    torch.manual_seed(2)
    table = torch.randn(9, 3)  # ids 1..4 domain 0, 5..8 domain 1
    ranges = [(1, 5), (5, 9)]
    hidden = torch.randn(1, 4, 3)
    targets = torch.tensor([[2, 0, 6, 3]])
    torch.manual_seed(7)
    sums, counts = domain_uniform_ce_sums(hidden, targets, table, ranges, num_sampled=6)
    torch.manual_seed(7)
    drawn = [torch.randint(lo, hi, (6,)) for lo, hi in ranges]  # one shared draw per domain, in order
    assert counts.tolist() == [2, 1]
    for d, positions in ((0, [0, 3]), (1, [2])):
        ref = 0.0
        for p in positions:
            t = int(targets[0, p])
            negs = [int(i) for i in drawn[d] if int(i) != t]  # a draw equal to the target is left out
            logits = hidden[0, p] @ table[[t] + negs].T
            ref = ref - torch.log_softmax(logits, 0)[0]
        assert torch.allclose(sums[d], ref, atol=1e-5)
    # a draw equal to the target must really have occurred for the exclusion to be checked
    assert any(int(targets[0, p]) in drawn[d].tolist() for d, ps in ((0, [0, 3]), (1, [2])) for p in ps)
    # gradients reach the drawn rows and the targets only
    table.requires_grad_(True)
    torch.manual_seed(7)
    s, _ = domain_uniform_ce_sums(hidden, targets, table, ranges, num_sampled=6)
    (s[0] + s[1]).backward()
    touched = set(table.grad.abs().sum(1).nonzero().flatten().tolist())
    assert touched <= {2, 3, 6} | set(torch.cat(drawn).tolist()) and {2, 3, 6} <= touched


def test_excluding_own_items_leaves_the_rows_other_items_out_of_each_softmax():
    from model.losses import domain_ce_sums

    torch.manual_seed(4)
    table = torch.randn(9, 3)  # ids 1..4 domain 0, 5..8 domain 1
    ranges = [(1, 5), (5, 9)]
    hidden = torch.randn(2, 3, 3)
    targets = torch.tensor([[2, 3, 6], [4, 0, 4]])
    exclude = torch.tensor([[1, 2, 3, 6, 0], [0, 4, 7, 0, 0]])
    sums, counts = domain_ce_sums(hidden, targets, table, ranges, exclude=exclude)
    # row 0 pos 0 (target 2): 1 and 3 leave domain 0's softmax; row 1 excludes only its target (4) and
    # a domain-1 id (7), so its domain-0 softmaxes stay whole; by hand, the items each softmax keeps:
    kept = {(0, 0): [2, 4], (0, 1): [3, 4], (0, 2): [5, 6, 7, 8], (1, 0): [1, 2, 3, 4], (1, 2): [1, 2, 3, 4]}
    ref = [torch.zeros(()), torch.zeros(())]
    for (b, p), cols in kept.items():
        t = int(targets[b, p])
        logits = hidden[b, p] @ table[cols].T
        ref[int(t >= 5)] = ref[int(t >= 5)] - torch.log_softmax(logits, 0)[cols.index(t)]
    assert counts.tolist() == [4, 1]
    assert all(torch.allclose(a, r, atol=1e-5) for a, r in zip(sums, ref))
    full, _ = domain_ce_sums(hidden, targets, table, ranges)
    assert full[0] > sums[0]  # fewer competitors: a smaller loss
    assert torch.allclose(full[1], sums[1])  # its one excluded id is its target, which stays

    # the model excludes its row's inputs and targets (earlier and later items alike)
    m = make(exclude_own_items=True).eval()
    items, tgts = torch.tensor([[0, 1, 4, 2, 5, 6]]), torch.tensor([[1, 4, 2, 5, 6, 3]])
    got, _ = m(items, targets=tgts)
    want, _ = domain_ce_sums(m.queries(m(items)), tgts, m.embedding.item.weight, m.ranges,
                             exclude=torch.cat([items, tgts], 1))
    plain, _ = domain_ce_sums(m.queries(m(items)), tgts, m.embedding.item.weight, m.ranges)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
    assert not torch.allclose(got[0], plain[0])
    with pytest.raises(ValueError, match="exclude_own_items needs loss=full, got 'uniform'"):
        make(loss="uniform", sampled_negatives=4, exclude_own_items=True)


@pytest.mark.parametrize("loss", ["sampled", "uniform"])
def test_model_trains_with_the_named_sampled_loss(loss):
    from model.losses import domain_sampled_ce_sums, domain_uniform_ce_sums

    m = make(domain_heads=True, loss=loss, sampled_negatives=5).eval()
    items = torch.tensor([[0, 1, 4, 2, 5, 6]])
    targets = torch.tensor([[1, 4, 2, 5, 6, 3]])
    torch.manual_seed(3)
    sums, _ = m(items, targets=targets)
    fn = domain_sampled_ce_sums if loss == "sampled" else domain_uniform_ce_sums
    torch.manual_seed(3)
    ref, _ = fn(m.queries(m(items)), targets, m.embedding.item.weight, m.ranges, 5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(sums, ref))
    with pytest.raises(ValueError, match=r"loss must be one of \['full', 'sampled', 'uniform'\], got 'sampeld'"):
        make(loss="sampeld")


def _masked_model(seed=0):
    return make(seed, causal=False, objective="masked", mask_prob=0.5)


def test_cloze_masks_labelled_positions_only_and_at_least_one_per_row():
    m = _masked_model()
    items = torch.tensor([[0, 0, 1, 4, 2, 5], [0, 0, 0, 0, 4, 1], [0, 0, 0, 0, 0, 2]])
    targets = torch.where((items >= 4), items, 0)  # label domain 1: ids 4..7
    targets[2] = 0  # a row without labels stays unmasked
    for seed in range(20):
        torch.manual_seed(seed)
        x, t = m.objective.training(items, targets)
        masked = x == 8  # the [MASK] id is n_items + 1
        assert not (masked & (targets == 0)).any() and masked[:2].any(1).all() and not masked[2].any()
        assert torch.equal(t, targets * masked) and torch.equal(x[~masked], items[~masked])
    # the share masked follows mask_prob over many draws
    big = torch.randint(4, 8, (400, 6))
    x, _ = m.objective.training(big, big)
    assert 0.4 < (x == 8).float().mean() < 0.6


def test_cloze_scoring_appends_a_mask_after_the_history():
    m = _masked_model().eval()
    items = torch.tensor([[0, 0, 1, 4, 2, 5]])
    shifted = torch.tensor([[0, 1, 4, 2, 5, 8]])
    h = m.encoder(m.embedding(shifted), shifted)[:, -1]
    lo, hi = m.ranges[1]
    assert torch.allclose(m(items, domain=1), m.queries(h)[1] @ m.embedding.item.weight[lo:hi].T, atol=1e-6)


def _dual_model(seed=0, view_domains=(0, 1), view_encoder_domains=None, **kw):
    """Views of ``view_domains`` (indices); with ``view_layers``, encoders are built for
    ``view_encoder_domains`` (the model views only ``view_domains`` of them: the others idle)."""
    names = [VOCAB.names[d] for d in (view_encoder_domains or view_domains)]
    return make(seed, n_layers=2, max_len=7, domain_heads=True, sequence="dual", view_domains=names,
                active=[VOCAB.names[d] for d in view_domains], **kw).eval()


def test_domain_view_is_the_own_domain_encoding_at_the_latest_own_event():
    m = _dual_model()
    items = torch.tensor([[0, 1, 4, 5, 2, 6, 7], [0, 0, 4, 4, 5, 6, 3]])
    for d, (lo, hi) in enumerate(m.ranges):
        view = m.domain_view(items, d)
        own = (items >= lo) & (items < hi)
        for b in range(items.shape[0]):
            for p in range(items.shape[1]):
                prev = [q for q in range(p + 1) if own[b, q]]
                if not prev:
                    assert torch.equal(view[b, p], torch.zeros(8))
                    continue
                alone = torch.where(own[b:b + 1], items[b:b + 1], 0)  # the other domain's events removed
                ref = m.encoder(m.embedding(alone), alone)[0, prev[-1]]
                assert torch.allclose(view[b, p], ref, atol=1e-5), (d, b, p)
        assert torch.allclose(m.domain_view(items, d, last_only=True), view[:, -1], atol=1e-6)


def test_domain_view_sees_nothing_after_its_position():
    m = _dual_model()
    items = torch.tensor([[1, 4, 2, 5, 3, 6, 7]])
    later = items.clone()
    later[0, 4:] = torch.tensor([2, 4, 1])  # change every event after position 3, both domains
    for d in range(2):
        a, b = m.domain_view(items, d), m.domain_view(later, d)
        assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
        assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)  # the change is visible afterwards


def test_dual_scores_add_the_domain_view_to_the_query():
    m = _dual_model()
    items = torch.tensor([[0, 1, 4, 5, 2, 6, 7]])
    h = m.encoder(m.embedding(items), items)[:, -1]
    for d, (lo, hi) in enumerate(m.ranges):
        q = m.queries(h)[d] + m.domain_view(items, d)[:, -1]
        assert torch.allclose(m(items, domain=d), q @ m.embedding.item.weight[lo:hi].T, atol=1e-5)
    # training uses the same per-position queries: the loss equals the CE of those scores
    targets = torch.tensor([[1, 4, 5, 2, 6, 7, 3]])
    sums, counts = m(items, targets=targets)
    hs = m.encoder(m.embedding(items), items)
    ref = []
    for d, (lo, hi) in enumerate(m.ranges):
        q = m.queries(hs)[d] + m.domain_view(items, d)
        sel = (targets >= lo) & (targets < hi)
        ref.append(torch.nn.functional.cross_entropy(q[sel] @ m.embedding.item.weight[lo:hi].T, targets[sel] - lo,
                                                     reduction="sum"))
    assert counts.tolist() == [3, 4]
    assert torch.allclose(torch.stack(sums), torch.stack(ref), atol=1e-4)


def test_a_view_on_one_domain_leaves_the_other_scoring_from_the_mixed_sequence():
    m = _dual_model(view_domains=[1])
    items = torch.tensor([[0, 1, 4, 5, 2, 6, 7]])
    targets = torch.tensor([[1, 4, 5, 2, 6, 7, 3]])
    hs = m.encoder(m.embedding(items), items)
    plain = m.queries(hs)
    table = m.embedding.item.weight
    # domain 0 has no view: its scores and loss are those of the mixed sequence alone
    lo, hi = m.ranges[0]
    assert torch.allclose(m(items, domain=0), plain[0][:, -1] @ table[lo:hi].T, atol=1e-5)
    sums, _ = m(items, targets=targets)
    sel = (targets >= lo) & (targets < hi)
    ref0 = torch.nn.functional.cross_entropy(plain[0][sel] @ table[lo:hi].T, targets[sel] - lo, reduction="sum")
    assert torch.allclose(sums[0], ref0, atol=1e-4)
    # domain 1 adds its own-domain view, which changes its scores
    lo, hi = m.ranges[1]
    view = m.domain_view(items, 1)
    assert view.abs().sum() > 0
    assert torch.allclose(m(items, domain=1), (plain[1] + view)[:, -1] @ table[lo:hi].T, atol=1e-5)
    sel = (targets >= lo) & (targets < hi)
    ref1 = torch.nn.functional.cross_entropy((plain[1] + view)[sel] @ table[lo:hi].T, targets[sel] - lo,
                                             reduction="sum")
    assert torch.allclose(sums[1], ref1, atol=1e-4)


def test_a_view_with_an_encoder_of_its_own_leaves_the_shared_encoder_to_the_mixed_sequence():
    """view_layers: domain 1's view runs through its own 1-block encoder; domain 0's encoder
    exists (another stage views domain 0) but this model does not view 0, so it stays idle."""
    m = _dual_model(view_domains=[1], view_layers=1, view_encoder_domains=[0, 1])
    assert sorted(m.view_encoders) == ["0", "1"] and len(m.view_encoders["1"].blocks) == 1
    items = torch.tensor([[0, 1, 4, 5, 2, 6, 7], [0, 0, 4, 4, 5, 6, 3]])
    targets = torch.tensor([[1, 4, 5, 2, 6, 7, 3], [0, 4, 4, 5, 6, 3, 5]])
    lo, hi = m.ranges[1]
    alone = torch.where((items >= lo) & (items < hi), items, 0)
    latest = torch.tensor([6, 5])  # each row's last domain-1 event
    ref = m.view_encoders["1"](m.embedding(alone), alone)[torch.arange(2), latest]
    view = m.domain_view(items, 1, last_only=True)
    assert torch.allclose(view, ref, atol=1e-5)
    assert not torch.allclose(view, m.encoder(m.embedding(alone), alone)[torch.arange(2), latest], atol=1e-3)
    h = m.encoder(m.embedding(items), items)[:, -1]
    table = m.embedding.item.weight
    assert torch.allclose(m(items, domain=1), (m.queries(h)[1] + ref) @ table[lo:hi].T, atol=1e-5)
    lo0, hi0 = m.ranges[0]
    assert torch.allclose(m(items, domain=0), m.queries(h)[0] @ table[lo0:hi0].T, atol=1e-5)
    sums, _ = m(items, targets=targets)
    sum(sums).backward()
    assert all(p.grad is None for p in m.view_encoders["0"].parameters())
    assert all(p.grad is not None for p in m.view_encoders["1"].parameters())


def test_an_idle_view_encoder_leaves_the_random_stream_and_the_other_weights_as_without_it():
    """A stage that does not view domain 0 (a target-only stage, say) still holds its encoder;
    building it must not move the global RNG, or the stage's dropout draws would differ from the
    same model without it. An encoder the model does use draws from the stream as usual."""
    with_idle = _dual_model(view_domains=[1], view_layers=1, view_encoder_domains=[0, 1])
    after_idle = torch.get_rng_state()
    without = _dual_model(view_domains=[1], view_layers=1, view_encoder_domains=[1])
    assert torch.equal(after_idle, torch.get_rng_state())
    a, b = with_idle.state_dict(), without.state_dict()
    assert set(a) - set(b) and all(k.startswith("view_encoders.0.") for k in set(a) - set(b))
    assert all(torch.equal(a[k], b[k]) for k in b)
    _dual_model(view_domains=[0, 1], view_layers=1, view_encoder_domains=[0, 1])
    assert not torch.equal(after_idle, torch.get_rng_state())  # both used: both draw


def test_a_shared_view_encoder_trains_in_a_stage_of_one_domain_and_serves_the_others_view():
    """view_shared: one view encoder for every domain. A stage that views domain 0 alone (the
    source stage) trains it, and the model that views both (the joint stage) reads domain 1's
    view through those same weights, where per-domain encoders would give domain 1 an untrained one."""
    shared = _dual_model(view_domains=[0], view_layers=1, view_encoder_domains=[0, 1], view_shared=True).train()
    per_domain = _dual_model(view_domains=[0], view_layers=1, view_encoder_domains=[0, 1])
    assert list(shared.view_encoders) == ["shared"] and sorted(per_domain.view_encoders) == ["0", "1"]
    n = sum(p.numel() for p in shared.parameters())
    assert n == sum(p.numel() for p in per_domain.parameters()) - sum(
        p.numel() for p in per_domain.view_encoders["1"].parameters())
    items = torch.tensor([[0, 1, 4, 5, 2, 6, 7], [0, 0, 4, 4, 5, 6, 3]])
    targets = torch.tensor([[1, 2, 3, 2, 1, 3, 2], [0, 1, 2, 3, 1, 2, 3]])  # domain 0's targets alone
    sums, _ = shared(items, targets=targets)
    sum(sums).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared.view_encoders["shared"].parameters())
    both = _dual_model(view_domains=[0, 1], view_layers=1, view_encoder_domains=[0, 1], view_shared=True)
    both.load_state_dict(shared.state_dict())
    lo, hi = both.ranges[1]
    alone = torch.where((items >= lo) & (items < hi), items, 0)
    ref = both.view_encoders["shared"](both.embedding(alone), alone)[torch.arange(2), torch.tensor([6, 5])]
    assert both.view_encoder(1) is both.view_encoder(0) is both.view_encoders["shared"]
    assert torch.allclose(both.domain_view(items, 1, last_only=True), ref, atol=1e-5)


def test_row_mean_weighs_every_row_the_same_whatever_its_number_of_targets():
    from model.losses import domain_ce_sums, domain_uniform_ce_sums

    torch.manual_seed(6)
    table = torch.randn(9, 3)  # ids 1..4 domain 0, 5..8 domain 1
    ranges = [(1, 5), (5, 9)]
    hidden = torch.randn(3, 4, 3)
    # domain 0: row 0 has three targets, row 1 one, row 2 none; domain 1: rows 0 and 2 one each
    targets = torch.tensor([[1, 2, 6, 3], [0, 0, 0, 4], [7, 0, 0, 0]])
    ce = {(b, p): -torch.log_softmax(hidden[b, p] @ table[lo:hi].T, 0)[int(targets[b, p]) - lo]
          for b in range(3) for p in range(4) for lo, hi in ranges if lo <= int(targets[b, p]) < hi}
    sums, counts = domain_ce_sums(hidden, targets, table, ranges, per_row=True)
    assert counts.tolist() == [2, 2]  # rows with targets in the domain
    row0 = (ce[0, 0] + ce[0, 1] + ce[0, 3]) / 3
    assert torch.allclose(sums[0], row0 + ce[1, 3], atol=1e-5)
    assert torch.allclose(sums[1], ce[0, 2] + ce[2, 0], atol=1e-5)
    per_target, n = domain_ce_sums(hidden, targets, table, ranges)
    assert n.tolist() == [4, 2] and not torch.allclose(sums[0] / 2, per_target[0] / 4)
    # a sampled loss: the row mean of the same draw's per-target losses (one row at a time by hand)
    torch.manual_seed(9)
    got, got_n = domain_uniform_ce_sums(hidden, targets, table, ranges, num_sampled=6, per_row=True)
    want = torch.zeros(2)
    for b in range(3):
        torch.manual_seed(9)  # the same shared draw per domain
        s, c = domain_uniform_ce_sums(hidden[b:b + 1], targets[b:b + 1], table, ranges, num_sampled=6)
        want = want + torch.stack([s[d] / c[d] if c[d] else s[d] for d in range(2)])
    assert got_n.tolist() == [2, 2] and torch.allclose(torch.stack(got), want, atol=1e-5)


def test_model_row_mean_option_and_its_check():
    m = make(loss_mean="row").eval()
    items, tgts = torch.tensor([[0, 1, 4, 2, 5, 6], [0, 0, 0, 0, 1, 2]]), torch.tensor([[1, 4, 2, 5, 6, 3], [0, 0, 0, 0, 2, 5]])
    sums, counts = m(items, targets=tgts)
    assert counts.tolist() == [2, 2]  # rows, not the 5 / 4 targets
    from model.losses import domain_ce_sums
    want, _ = domain_ce_sums(m.queries(m(items)), tgts, m.embedding.item.weight, m.ranges, per_row=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(sums, want))
    with pytest.raises(ValueError, match=r"loss_mean must be one of \['target', 'row'\], got 'user'"):
        make(loss_mean="user")


def test_cosine_scoring_and_label_smoothing_by_hand():
    """temperature > 0: training logits and evaluation scores are cos(query, item) / temperature;
    label smoothing: (1 - e) * CE + e * mean over the domain's items of -log p."""
    kw = dict(domain_heads=True)
    items, tgts = torch.tensor([[0, 1, 4, 2, 5, 6]]), torch.tensor([[1, 4, 2, 5, 6, 3]])
    dot = make(**kw).eval()
    cos = make(**kw, temperature=0.25, label_smoothing=0.2).eval()
    cos.load_state_dict(dot.state_dict())
    with torch.no_grad():
        for h in cos.heads:  # a head that is not the identity, so the query's norm is the head's
            h.weight.normal_()
    q = cos.queries(cos(items))  # per-domain queries [1, L, D]
    table = cos.embedding.item.weight
    unit = table / table.norm(dim=-1, keepdim=True)
    # evaluation scores: domain B at the last position
    want = (q[1][:, -1] / q[1][:, -1].norm(dim=-1, keepdim=True)) @ unit[4:8].T / 0.25
    assert torch.allclose(cos(items, domain=1), want, atol=1e-5)
    assert not torch.allclose(dot(items, domain=1), want, atol=1e-2)
    # training: each target's smoothed CE over its domain from the cosine logits
    sums, counts = cos(items, targets=tgts)
    want = [0.0, 0.0]
    for p, t in enumerate(tgts[0].tolist()):
        d = int(t >= 4)
        lo, hi = cos.ranges[d]
        qd = q[d][0, p] / q[d][0, p].norm()
        logp = torch.log_softmax(unit[lo:hi] @ qd / 0.25, -1)
        want[d] = want[d] - (0.8 * logp[t - lo] + 0.2 * logp.mean())
    assert counts.tolist() == [3, 3]
    assert torch.allclose(torch.stack(sums), torch.stack(want), atol=1e-4)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        make(**kw, temperature=-1.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        make(**kw, label_smoothing=1.0)
    with pytest.raises(ValueError, match="label_smoothing needs loss=full without exclude_own_items"):
        make(**kw, label_smoothing=0.1, exclude_own_items=True)


def test_uniform_aux_adds_the_uniform_negatives_ce_of_the_listed_domains_to_the_full_ce():
    """uniform_aux=w: a listed domain's loss is its full-softmax CE plus w times its CE against
    num_sampled uniform draws of the domain (cosine logits, by hand); an unlisted domain is the
    full CE alone and draws nothing, so an empty list leaves the random stream as without it."""
    kw = dict(domain_heads=True, temperature=0.5, sampled_negatives=5)
    items, tgts = torch.tensor([[0, 1, 4, 2, 5, 6]]), torch.tensor([[1, 4, 2, 5, 6, 3]])
    plain = make(**kw).eval()
    aux = make(**kw, uniform_aux=0.5, uniform_aux_domains=["B"]).eval()
    aux.load_state_dict(plain.state_dict())
    ref, ref_counts = plain(items, targets=tgts)
    torch.manual_seed(7)
    sums, counts = aux(items, targets=tgts)
    after = torch.get_rng_state()
    torch.manual_seed(7)
    drawn = torch.randint(4, 8, (5,))  # the one draw domain 1 shares across its targets
    assert torch.equal(after, torch.get_rng_state())  # and nothing else was drawn
    q = aux.queries(aux(items))[1][0]  # [L, D]
    unit = torch.nn.functional.normalize(aux.embedding.item.weight, dim=-1)
    want = torch.zeros(())
    for p, t in enumerate(tgts[0].tolist()):
        if t < 4:
            continue
        logit = lambda i: torch.nn.functional.normalize(q[p], dim=-1) @ unit[i] / 0.5  # noqa: E731
        negs = [logit(i) for i in drawn.tolist() if i != t]
        want = want - torch.log_softmax(torch.stack([logit(t)] + negs), 0)[0]
    assert counts.tolist() == ref_counts.tolist() == [3, 3]
    assert torch.allclose(sums[0], ref[0], atol=1e-6)
    assert torch.allclose(sums[1], ref[1] + 0.5 * want, atol=1e-4)
    # no listed domain the model trains: no draws, the plain model's loss and random stream
    none = make(**kw, uniform_aux=0.5, uniform_aux_domains=["A"], active=["B"]).eval()
    none.load_state_dict(plain.state_dict())
    torch.manual_seed(7)
    nsums, _ = none(items, targets=tgts)
    assert torch.equal(torch.stack(nsums), torch.stack(ref))
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(7).get_state())
    with pytest.raises(ValueError, match="uniform_aux=0.5 needs loss=full, got 'sampled'"):
        make(**{**kw, "loss": "sampled"}, uniform_aux=0.5)


def test_item_bias_adds_a_learned_bias_to_every_score_by_hand():
    """item_bias: evaluation scores and training logits are cos(query, item) / t + bias[item]; the
    bias starts at zero (the model scores as without it, same random stream) and learns."""
    kw = dict(domain_heads=True, temperature=0.25)
    items, tgts = torch.tensor([[0, 1, 4, 2, 5, 6]]), torch.tensor([[1, 4, 2, 5, 6, 3]])
    plain = make(**kw).eval()
    biased = make(**kw, item_bias=True).eval()
    # zero bias: the same weights (same random stream) and scores as without it
    assert all(torch.equal(v, biased.state_dict()[k]) for k, v in plain.state_dict().items())
    assert torch.allclose(biased(items, domain=1), plain(items, domain=1), atol=1e-6)
    with torch.no_grad():
        biased.item_bias.copy_(torch.arange(8.0) * 0.3)
    assert torch.allclose(biased(items, domain=1), plain(items, domain=1) + torch.arange(4.0, 8.0) * 0.3, atol=1e-5)
    sums, _ = biased(items, targets=tgts)
    q = plain.queries(plain(items))
    unit = torch.nn.functional.normalize(plain.embedding.item.weight, dim=-1)
    want = [0.0, 0.0]
    for p, t in enumerate(tgts[0].tolist()):
        d = int(t >= 4)
        lo, hi = plain.ranges[d]
        logits = unit[lo:hi] @ (q[d][0, p] / q[d][0, p].norm()) / 0.25 + torch.arange(lo, hi) * 0.3
        want[d] = want[d] - torch.log_softmax(logits, -1)[t - lo]
    assert torch.allclose(torch.stack(sums), torch.stack(want), atol=1e-4)
    sum(sums).backward()
    assert biased.item_bias.grad[1:].abs().min() > 0  # every item's bias takes a gradient (full softmax)


def test_a_batch_trimmed_of_its_padding_columns_scores_and_trains_as_the_padded_one():
    """Positions count from the right: dropping leading all-padding columns (train.length_buckets)
    changes no output, loss or score."""
    from train.data.stream import trim_batch
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, ff_mult=2, dropout=0.0, emb_dropout=0.0, max_len=10,
                      sequence="dual", view_layers=1)
    m = build_recommender(cfg, Vocabulary(("A", "B"), (30, 40))).eval()
    items = torch.zeros(3, 10, dtype=torch.long)
    items[0, 6:] = torch.tensor([3, 35, 7, 40])
    items[1, 7:] = torch.tensor([50, 2, 61])
    items[2, 5:] = torch.tensor([1, 2, 44, 45, 9])
    targets = torch.zeros_like(items)
    targets[:, :-1] = torch.where(items[:, :-1] > 0, items[:, 1:], 0)
    cut = trim_batch({"items": items, "targets": targets})
    assert cut["items"].shape[1] == 5
    with torch.no_grad():
        for d in (0, 1):
            assert torch.allclose(m(cut["items"], domain=d), m(items, domain=d), atol=1e-5)
        a, _ = m(items, targets=targets)
        b, _ = m(cut["items"], targets=cut["targets"])
        assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="more than model.max_len=10"):
        m(torch.ones(1, 11, dtype=torch.long), domain=0)


def test_every_loss_has_one_interface_chosen_by_name():
    """model.losses.LOSSES builds each model.loss; every loss describes itself and says how many
    logits a target is scored against (no hasattr or name checks elsewhere)."""
    from model.losses import LOSSES
    from model.recommender import training_loss_of
    assert set(LOSSES) == {"full", "sampled", "uniform"}
    cols = {}
    for name in LOSSES:
        loss = training_loss_of(ModelConfig(loss=name, sampled_negatives=100), [])
        assert loss.describe(["A", "B"]) and loss.describe()
        cols[name] = loss.columns(5000, 64)
    assert cols == {"full": 5000, "sampled": 164, "uniform": 101}
    aux = training_loss_of(ModelConfig(uniform_aux=0.5, sampled_negatives=100), [1])
    assert aux.columns(5000, 64) == 5101 and "for B" in aux.describe(["A", "B"])


def test_the_vocabulary_is_the_one_description_of_item_id_ranges():
    import numpy as np
    v = Vocabulary(("A", "B", "C"), (3, 4, 2))
    assert v.ranges == [(1, 4), (4, 8), (8, 10)] and v.offsets == (0, 3, 7) and v.ends == (3, 7, 9) and v.n_items == 9
    ids = np.array([1, 3, 4, 7, 8, 9])
    assert v.of_ids(ids).tolist() == [0, 0, 1, 1, 2, 2] and isinstance(v.of_ids(ids), np.ndarray)
    assert v.of_ids(torch.tensor([9, 1])).tolist() == [2, 0]
    assert v.columns(1, torch.tensor([4, 7])).tolist() == [0, 3]
    assert v.item_domain().tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 3, 3]


def test_transition_table_adds_the_latest_own_domain_events_vector_to_each_query_by_hand():
    """transition_table: domain d's query at position p adds T[the row's latest d event at or before
    p] (nothing before the first); T starts at zero (the model scores as without it, same random
    stream); only the rows of the input's latest events take a gradient."""
    from model.recommender import latest_of_domain

    items, tgts = torch.tensor([[0, 1, 4, 2, 5, 6]]), torch.tensor([[1, 4, 2, 5, 6, 3]])
    assert latest_of_domain(items, 1, 4).tolist() == [[0, 1, 1, 2, 2, 2]]
    assert latest_of_domain(items, 4, 8).tolist() == [[0, 0, 4, 4, 5, 6]]
    kw = dict(domain_heads=True)
    plain = make(**kw).eval()
    table = make(**kw, transition_table=True).eval()
    assert all(torch.equal(v, table.state_dict()[k]) for k, v in plain.state_dict().items())
    assert torch.allclose(table(items, domain=1), plain(items, domain=1), atol=1e-6)
    with torch.no_grad():
        table.transition.weight.copy_(torch.randn(8, 8))
        table.transition.weight[0].zero_()
    T = table.transition.weight.detach()
    unit = plain.embedding.item.weight
    q = plain.queries(plain(items))
    # scoring: the last position's query of B adds T[6] (the latest B event); of A, T[2]
    assert torch.allclose(table(items, domain=1), (q[1][0, -1] + T[6]) @ unit[4:8].T, atol=1e-5)
    assert torch.allclose(table(items, domain=0), (q[0][0, -1] + T[2]) @ unit[1:4].T, atol=1e-5)
    sums, _ = table(items, targets=tgts)
    assert torch.allclose(torch.stack(sums), _table_ce_by_hand(plain, items, tgts, T), atol=1e-4)
    sum(sums).backward()
    g = table.transition.weight.grad.abs().sum(1)
    # 3 and 7 are no input; 6, the latest B event only where the target (3) is A's, scores nothing
    assert (g[[1, 2, 4, 5]] > 0).all() and g[[0, 3, 6, 7]].eq(0).all()
    from tools.plan import count_parts  # the table is a row an item: planned with the item table
    assert count_parts(table)["item_table"] == 2 * count_parts(plain)["item_table"] == 2 * 8 * 8
    assert count_parts(table)["encoder"] == count_parts(plain)["encoder"]
    with pytest.raises(ValueError, match="transition_table needs objective=next_item"):
        ModelConfig(transition_table=True, objective="masked", causal=False)


def _table_ce_by_hand(plain, items, tgts, T, keep=None):
    """Per-domain CE sums of ``plain``'s queries plus T[the latest own-domain event] where ``keep``."""
    from model.recommender import latest_of_domain

    q, unit = plain.queries(plain(items)), plain.embedding.item.weight
    want = [torch.zeros(()), torch.zeros(())]
    for p, t in enumerate(tgts[0].tolist()):
        d = int(t >= 4)
        lo, hi = plain.ranges[d]
        add = T[int(latest_of_domain(items, lo, hi)[0, p])] * (1.0 if keep is None else float(keep[p]))
        want[d] = want[d] - torch.log_softmax(unit[lo:hi] @ (q[d][0, p] + add), -1)[t - lo]
    return torch.stack(want)


def test_transition_residual_fits_the_table_to_what_the_model_without_it_misses():
    """transition_residual: the training CE is the model's without the table plus the CE of its
    queries with T added where all but T is held fixed; so every other parameter takes the
    gradient of the model without the table, T the gradient of the second CE alone; scoring adds
    T as the plain table does."""
    items, tgts = torch.tensor([[0, 1, 4, 2, 5, 6]]), torch.tensor([[1, 4, 2, 5, 6, 3]])
    plain = make(domain_heads=True).eval()
    res = make(domain_heads=True, transition_table=True, transition_residual=True).eval()
    with torch.no_grad():
        res.transition.weight.copy_(torch.randn(8, 8))
        res.transition.weight[0].zero_()
    T = res.transition.weight.detach().clone()
    sums, counts = res(items, targets=tgts)
    alone = _table_ce_by_hand(plain, items, tgts, torch.zeros_like(T))
    assert torch.allclose(torch.stack(sums), alone + _table_ce_by_hand(plain, items, tgts, T), atol=1e-4)
    assert counts.tolist() == [3, 3]
    sum(sums).backward()
    alone.sum().backward()
    named = dict(res.named_parameters())
    for name, p in plain.named_parameters():  # encoder, heads, item vectors: as without the table
        assert torch.allclose(named[name].grad, p.grad, atol=1e-5), name
    t = T.clone().requires_grad_()
    want, = torch.autograd.grad(_table_ce_by_hand(plain, items, tgts, t).sum(), t)
    g = res.transition.weight.grad  # row 0 is padding: the table's row 0 takes no gradient
    assert torch.allclose(g[1:], want[1:], atol=1e-5) and g[1:].abs().sum() > 0 and g[0].eq(0).all()
    q, unit = plain.queries(plain(items)), plain.embedding.item.weight
    assert torch.allclose(res(items, domain=1), (q[1][0, -1] + T[6]) @ unit[4:8].T, atol=1e-5)
    with pytest.raises(ValueError, match="transition_residual needs transition_table: true"):
        ModelConfig(transition_residual=True)


def test_transition_dropout_leaves_the_tables_vector_out_at_a_random_share_of_training_positions():
    """transition_dropout=p: in training each position's queries drop the table's vector where a
    uniform draw (one a position, after the encoder's) falls below p; in evaluation it always adds."""
    items, tgts = torch.tensor([[0, 1, 4, 2, 5, 6]]), torch.tensor([[1, 4, 2, 5, 6, 3]])
    plain = make(domain_heads=True).eval()
    table = make(domain_heads=True, transition_table=True, transition_dropout=0.5)
    with torch.no_grad():
        table.transition.weight.copy_(torch.randn(8, 8))
        table.transition.weight[0].zero_()
    T = table.transition.weight.detach()
    torch.manual_seed(1)
    keep = (torch.rand(items.shape) >= 0.5)[0]
    assert keep.any() and not keep.all()  # the seed drops some positions and keeps others
    torch.manual_seed(1)
    sums, _ = table.train()(items, targets=tgts)
    assert torch.allclose(torch.stack(sums), _table_ce_by_hand(plain, items, tgts, T, keep), atol=1e-4)
    assert not torch.allclose(torch.stack(sums), _table_ce_by_hand(plain, items, tgts, T), atol=1e-3)
    sums, _ = table.eval()(items, targets=tgts)  # evaluation: every position adds it
    assert torch.allclose(torch.stack(sums), _table_ce_by_hand(plain, items, tgts, T), atol=1e-4)
    with pytest.raises(ValueError, match="transition_dropout needs transition_table: true"):
        ModelConfig(transition_dropout=0.5)
    with pytest.raises(ValueError, match=r"transition_dropout must be in \[0, 1\)"):
        ModelConfig(transition_table=True, transition_dropout=1.0)
