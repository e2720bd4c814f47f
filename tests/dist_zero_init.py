"""Run under torchrun with 2 ranks: the model as ZeRO-3 constructs it (before any engine) holds
half of every parameter on each rank and no gathered copy: the process's live tensors are half
the model. Writes every rank's findings as JSON to argv[1]."""
import json
import sys

import torch

from train.config import load_config
from train.engine import exit_now_if_distributed, teardown_distributed, all_gather_objects, construct, setup_distributed
from tools.memory import _live_bytes
from train.stages import build_model

env, _ = setup_distributed()
cfg = load_config("configs/experiment/tiny.yaml", ["model.d_model=512", "model.n_layers=4", "model.n_heads=4",
                                                    "model.item_bias=true", "model.sequence=dual", "model.view_layers=1",
                                                    "model.ff_mult=4", "train.zero_stage=3"])
manifest = {"domains": [{"name": n, "offset": 2000 * i, "n_items": 2000} for i, n in enumerate(cfg.data.domains)]}
model, _ = construct(lambda: build_model(cfg, manifest), train=cfg.train, world_size=env.world_size)
params = list(model.parameters())
out = {"total": sum(p.ds_numel for p in params), "held": sum(p.ds_tensor.numel() for p in params),
       "gathered": sum(p.data.numel() for p in params), "live_bytes": _live_bytes(),
       "partitioned": all(hasattr(p, "ds_tensor") for p in params)}
# the held halves of both ranks are the model: gathered, they equal a plain single-process build
with torch.no_grad():
    import deepspeed
    with deepspeed.zero.GatheredParameters(params):
        full = {k: v.clone() for k, v in model.state_dict().items()}
plain = build_model(cfg, manifest).state_dict()
out["same_as_plain_build"] = all(torch.equal(full[k], plain[k]) for k in plain)
found = all_gather_objects(out)
if env.rank == 0:
    json.dump(found, open(sys.argv[1], "w"))
teardown_distributed()
exit_now_if_distributed(0)
