"""train.joint.distill: the target-only model as a teacher of the joint stage's target-domain targets."""
import pytest
import torch

from model import ModelConfig, SoftTargets, Vocabulary, build_recommender
from train.checkpoint import ResumeError
from train.data.stream import train_rows
from train.distill import Teacher, own_domain_rows, teacher_checkpoints

VOCAB = Vocabulary(("A", "B"), (3, 5))  # ids 1-3 domain 0 (A), 4-8 domain 1 (B)
SMALL = dict(d_model=8, n_layers=2, n_heads=2, ff_mult=2, dropout=0.0, emb_dropout=0.0, max_len=8, domain_heads=True,
             temperature=0.2)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return build_recommender(ModelConfig(**{**SMALL, **kw}), VOCAB).eval()


def test_soft_targets_mix_the_teachers_ce_into_the_targets_it_covers_by_hand():
    """A covered target's CE is (1 - w) CE(target) + w CE(teacher's distribution); an uncovered
    one's and the other domain's stay the plain CE."""
    m = make()
    items, tgts = torch.tensor([[0, 1, 4, 2, 5, 6, 3, 7]]), torch.tensor([[1, 4, 2, 5, 6, 3, 7, 8]])
    plain, counts = m(items, targets=tgts)
    b = [p for p, t in enumerate(tgts[0].tolist()) if t >= 4]  # B's targets, in the loss's order
    probs = torch.softmax(torch.randn(len(b), 5), -1)
    has = torch.tensor([True, False, True, True, False])
    sums, counts2 = m(items, targets=tgts, soft=SoftTargets({1: probs}, {1: has}, 0.3))
    assert torch.equal(counts, counts2) and torch.allclose(sums[0], plain[0])
    q = m.queries(m(items))[1][0]
    table = torch.nn.functional.normalize(m.embedding.item.weight[4:9], dim=-1)
    want = 0.0
    for i, p in enumerate(b):
        logp = torch.log_softmax(torch.nn.functional.normalize(q[p], dim=-1) @ table.T / 0.2, -1)
        ce = -logp[tgts[0, p] - 4]
        want = want + (0.7 * ce - 0.3 * (probs[i] * logp).sum() if has[i] else ce)
    assert torch.allclose(sums[1], want, atol=1e-5) and not torch.allclose(sums[1], plain[1], atol=1e-3)


def test_next_item_logits_at_the_last_column_are_the_models_scores():
    """What a teacher reads at a position is what the model scores there: at the last column the
    evaluation scores (own-domain view and transition table included)."""
    m = make(sequence="dual", view_layers=1, transition_table=True)
    with torch.no_grad():
        m.transition.weight.normal_()
    items = torch.tensor([[0, 1, 4, 2, 5, 6, 3, 7], [0, 0, 0, 0, 4, 1, 2, 8]])
    for d in (0, 1):
        got = m.next_item_logits(items, d, torch.tensor([0, 1]), torch.tensor([7, 7]))
        assert torch.allclose(got, m.score(items, d), atol=1e-5)


def test_own_domain_rows_right_align_a_domains_events_in_order():
    items = torch.tensor([[0, 0, 4, 1, 5, 2, 6, 3], [0, 1, 2, 3, 1, 2, 3, 1]])
    sub, dest = own_domain_rows(items, (items >= 4) & (items < 9))
    assert sub.tolist() == [[0, 0, 0, 0, 0, 4, 5, 6], [0] * 8]
    assert dest[0, [2, 4, 6]].tolist() == [5, 6, 7]


def test_the_teacher_reads_each_target_as_the_target_only_stream_row_does():
    """For every B target of a mixed training row after a B event, the teacher's distribution is
    the teacher model's softmax (of its scores / the temperature) at the position of the target-only stream's row (the same user's B
    events alone) where that target is predicted; a B target before any B event has none."""
    teacher = make(seed=1)
    seq = [1, 4, 2, 5, 6, 3, 1, 7, 8]  # a user's events; the last is a B event (so a B row's last target)
    sample = {"items": seq, "user": 0}
    mixed = train_rows([sample], dom=VOCAB, label_domain=1, max_len=8, only_domain=False)
    own = train_rows([sample], dom=VOCAB, label_domain=1, max_len=8, only_domain=True)
    items, targets = torch.from_numpy(mixed["items"]), torch.from_numpy(mixed["targets"])
    soft = Teacher({1: teacher}, VOCAB.ranges, 0.5, temperature=0.5)(items, targets)
    assert [t for t in targets[0].tolist() if t] == [4, 5, 6, 7, 8]
    assert soft.has[1].tolist() == [False, True, True, True, True]  # 4 follows no B event
    own_items, own_targets = torch.from_numpy(own["items"]), torch.from_numpy(own["targets"])
    cols = own_targets[0].nonzero()[:, 0]
    assert own_targets[0, cols].tolist() == [5, 6, 7, 8]
    with torch.no_grad():
        want = torch.softmax(teacher.next_item_logits(own_items, 1, torch.zeros_like(cols), cols) / 0.5, -1)
    assert torch.allclose(soft.probs[1][1:], want, atol=1e-6)
    assert torch.equal(soft.probs[1][0], torch.zeros(5))


def test_teacher_checkpoints_come_from_this_run_else_from_init_from(tmp_path):
    (tmp_path / "b" / "target_only" / "checkpoints" / "best").mkdir(parents=True)
    assert teacher_checkpoints(tmp_path / "a", str(tmp_path / "b"), "target_only") == \
        tmp_path / "b" / "target_only" / "checkpoints"
    (tmp_path / "a" / "target_only" / "checkpoints" / "best").mkdir(parents=True)
    assert teacher_checkpoints(tmp_path / "a", str(tmp_path / "b"), "target_only") == \
        tmp_path / "a" / "target_only" / "checkpoints"
    with pytest.raises(ResumeError, match=r"no best weights of stage target_only-B in .*c/target_only-B/checkpoints"):
        teacher_checkpoints(tmp_path / "c", "", "target_only-B")
