"""RecBole's SASRec on exactly xdrec's target-only split, for `bench/recbole.sh` (run in RecBole's own
venv; recbole is never an xdrec dependency).

xdrec's prepared folder gives, per user, the target domain's events in time order (training
sequence, valid target, test target). They are written as RecBole's pre-split benchmark files
(``<name>.train.inter``: one row per training target with its history of the domain,
``.valid.inter`` / ``.test.inter``: one row per user evaluated there), so RecBole trains and ranks
what xdrec's target-only stage trains and ranks: next-item CE over the full catalogue of the
domain, full ranking (RecBole leaves the user's training items out of the candidates, as
``eval.exclude_history`` does), early stopping on valid NDCG@10. The result (test metrics, epochs,
seconds per epoch) is written as JSON.

    python bench/recbole_sasrec.py <prepared folder> <domain> <out.json> [--epochs 200] [--stopping-step 3]
"""
from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path


def _samples(folder: Path, domain: str, split: str):
    for tar in sorted((folder / domain).glob(f"{split}-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    yield json.load(t.extractfile(m))


def write_benchmark(folder: Path, domain: str, out: Path, max_len: int) -> dict:
    """RecBole atomic files of the domain's target-only split; returns their row counts."""
    manifest = json.loads((folder / "manifest.json").read_text())
    d = next(x for x in manifest["domains"] if x["name"] == domain)
    lo, hi = d["offset"] + 1, d["offset"] + d["n_items"]
    own = lambda items: [i for i in items if lo <= i <= hi]
    out.mkdir(parents=True, exist_ok=True)
    head = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    counts = {}
    for split in ("train", "valid", "test"):
        rows = []
        for s in _samples(folder, domain, split):
            seq = own(s["items"])
            if split == "train":
                rows += [(s["user"], seq[max(0, p - max_len):p], seq[p]) for p in range(1, len(seq))]
            elif seq:
                rows.append((s["user"], seq[-max_len:], s["target"]))
        name = out / f"{out.name}.{split}.inter"
        name.write_text(head + "".join(f"{u}\t{' '.join(map(str, h))}\t{t}\n" for u, h, t in rows))
        counts[split] = len(rows)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path, help="xdrec's prepared folder, data/prepared/<name>")
    ap.add_argument("domain")
    ap.add_argument("out", type=Path)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--stopping-step", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("runs/recbole"))
    a = ap.parse_args()

    name = f"{a.folder.name}-{a.domain}"
    counts = write_benchmark(a.folder, a.domain, a.work / name, max_len=50)
    config = {  # xdrec's `amazon` model sizes and the target-only stage's batch and learning rate
        "data_path": str(a.work), "benchmark_filename": ["train", "valid", "test"],
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "alias_of_item_id": ["item_id_list"], "load_col": {"inter": ["user_id", "item_id_list",
                                                                                       "item_id"]},
        "MAX_ITEM_LIST_LENGTH": 50, "hidden_size": 128, "inner_size": 512, "n_layers": 2, "n_heads": 2,
        "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu", "loss_type": "CE",
        "train_neg_sample_args": None, "train_batch_size": 128, "learning_rate": 0.002, "epochs": a.epochs,
        "stopping_step": a.stopping_step, "eval_step": 1, "valid_metric": "NDCG@10", "topk": [10],
        "metrics": ["Hit", "NDCG", "MRR"], "eval_args": {"mode": "full", "order": "TO"}, "eval_batch_size": 512,
        "worker": 0, "seed": 0, "reproducibility": True, "show_progress": False, "checkpoint_dir": str(a.work / "saved"),
    }
    t0 = time.time()
    valid, test, epochs = _train(name, config)
    wall = time.time() - t0
    out = {"model": "RecBole 1.2.1 SASRec", "data": str(a.folder), "domain": a.domain, "rows": counts, "config": config,
           "wall_s": wall, "epochs": len(epochs), "epoch_s": epochs, "best_valid": valid, "test": test}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("test", "epochs", "wall_s")}))


def _train(name: str, config_dict: dict) -> tuple[dict, dict, list[float]]:
    """RecBole's own pipeline (as its quick start runs it); returns (best valid, test, seconds of
    each training epoch)."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    config = Config(model="SASRec", dataset=name, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    trainer = Trainer(config, SASRec(config, train._dataset).to(config["device"]))
    epochs: list[float] = []
    one_epoch = trainer._train_epoch

    def timed(*args, **kw):
        t = time.time()
        try:
            return one_epoch(*args, **kw)
        finally:
            epochs.append(time.time() - t)
    trainer._train_epoch = timed
    # RecBole reloads its best model with a bare torch.load, which torch >= 2.6 refuses for its
    # pickled config; the best weights are kept in memory instead and put back before testing
    kept: dict = {}
    trainer._save_checkpoint = lambda *a, **k: kept.update(
        state={n: v.detach().clone() for n, v in trainer.model.state_dict().items()})
    _, best = trainer.fit(train, valid, saved=True, show_progress=False)
    trainer.model.load_state_dict(kept["state"])
    result = trainer.evaluate(test, load_best_model=False, show_progress=False)
    return ({k: float(v) for k, v in best.items()}, {k: float(v) for k, v in result.items()}, epochs)


if __name__ == "__main__":
    main()
