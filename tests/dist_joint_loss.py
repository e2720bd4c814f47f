"""Run under ``torchrun --nproc_per_node 2``: the joint loss over ranks equals the single-process
loss of the same global batch, and so do the (rank-averaged) gradients, although rank 0's rows
hold no target-domain row at all. Rank 0 writes the comparison as JSON to argv[1]."""
import json
import sys

import torch
import torch.distributed as dist

from model import ModelConfig, Vocabulary, build_recommender, domain_cross_entropy
from train.engine import exit_now_if_distributed, teardown_distributed, global_domain_loss, loss_value, setup_distributed


def model():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=8, n_layers=1, n_heads=2, ff_mult=2, dropout=0.0, emb_dropout=0.0, max_len=5)
    return build_recommender(cfg, Vocabulary(("A", "B"), (5, 6)))  # ids 1-5 domain 0, 6-11 domain 1


items = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 5, 1, 2],      # rank 0: source targets only
                      [1, 6, 2, 7, 8], [0, 9, 10, 3, 11]])  # rank 1: both domains
targets = torch.tensor([[0, 2, 3, 4, 5], [0, 0, 1, 2, 3],
                        [0, 0, 7, 8, 9], [0, 10, 0, 11, 6]])
weights = [0.7, 1.3]

env, _ = setup_distributed()
assert env.world_size == 2, env
m = model()
rows = slice(2 * env.rank, 2 * env.rank + 2)
sums, counts = m(items[rows], targets=targets[rows])
loss, stats = global_domain_loss(sums, counts, weights)
value = float(loss_value(stats, weights))
loss.backward()
grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
dist.all_reduce(grads)
grads /= env.world_size  # what data-parallel averaging gives

ref = model()
ref_loss, _, ref_counts = domain_cross_entropy(ref.queries(ref(items)), targets, ref.embedding.item.weight,
                                               ref.ranges, weights)
ref_loss.backward()
ref_grads = torch.cat([p.grad.flatten() for p in ref.parameters() if p.grad is not None])
if env.rank == 0:
    json.dump({"local_counts": counts.tolist(), "value": value, "ref": float(ref_loss),
               "grad_max_diff": float((grads - ref_grads).abs().max()), "ref_counts": ref_counts},
              open(sys.argv[1], "w"))
teardown_distributed()
exit_now_if_distributed(0)
