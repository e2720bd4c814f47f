"""Run under torchrun with 2 ranks: ``train.autocast=bf16`` runs the training forward's matrix
products in bfloat16 (DeepSpeed's torch_autocast) while the weights, their gradients and the
loss stay fp32, and scoring through the same engine stays fp32 throughout (the scores equal the
bare module's). Writes every rank's findings as JSON to argv[1]."""
import json
import sys

import torch

from train.config import load_config
from train.engine import all_gather_objects, build_engine, exit_now_if_distributed, setup_distributed, teardown_distributed
from train.stages import build_model

env, _ = setup_distributed()
cfg = load_config("configs/experiment/tiny.yaml", ["train.autocast=bf16", "train.zero_stage=2"])
manifest = {"domains": [{"name": n, "offset": 80 * i, "n_items": 80} for i, n in enumerate(cfg.data.domains)]}
model, engine = build_engine(lambda: build_model(cfg, manifest), train=cfg.train, stage=cfg.train.joint,
                             total_steps=10, world_size=env.world_size)
seen: list[str] = []
for m in model.modules():
    if isinstance(m, torch.nn.Linear):
        m.register_forward_hook(lambda mod, args, out: seen.append(str(out.dtype)))
g = torch.Generator().manual_seed(env.rank)
items, targets = torch.randint(1, 161, (8, 12), generator=g), torch.randint(1, 161, (8, 12), generator=g)
sums, counts = engine(items, targets=targets)
out = {"train_linear": sorted(set(seen)), "loss": str(torch.stack(sums).dtype)}
engine.backward(sum(sums))
engine.step()
out["weights"] = sorted({str(p.dtype) for p in model.parameters()})
seen.clear()
model.eval()
scores = engine(items, domain=1)
out["score_linear"], out["scores"] = sorted(set(seen)), str(scores.dtype)
out["scores_as_module"] = bool(torch.equal(scores, model(items, domain=1)))
found = all_gather_objects(out)
if env.rank == 0:
    json.dump(found, open(sys.argv[1], "w"))
teardown_distributed()
exit_now_if_distributed(0)
