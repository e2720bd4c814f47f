"""``xdrec plan``: what a model costs per rank under ZeRO 0-3, before anything is trained.

    xdrec plan configs/experiment/<x>.yaml [a.b=value ...] [--world-size N] [--memory-per-rank 80GiB]

Parameters are counted by part on the meta device (no memory). Per-rank bytes follow what
DeepSpeed keeps (measured with ``python -m tools.memory``, live tensors after a step, 2 ranks,
bf16 156M and fp32 60M parameters, each within 2% of these counts):

=========  ==========================  ==========================
precision  replicated, bytes/param     partitioned over N ranks
=========  ==========================  ==========================
fp32 Z0    4 weights + 8 AdamW          -
fp32 Z1/2  4 weights                    4 fp32 master + 8 AdamW
fp32 Z3    -                            4 weights + 4 master + 8 AdamW + 4 gradient
bf16 Z0    2 weights + 4 master + 8     -
bf16 Z1/2  2 weights                    4 master + 8 AdamW
bf16 Z3    -                            2 weights + 4 master + 8 AdamW + 2 gradient
=========  ==========================  ==========================

Gradients while backward runs: the whole model's at ZeRO-0 (weight dtype), this rank's
partition at ZeRO-1/2 (their reduction happens during backward), none extra at ZeRO-3 (its
partition is counted above). Buffers: the reduce (and ZeRO-1/2 allgather) buckets of
``train.engine.zero_settings`` and, at ZeRO-3, the gathered blocks it allows. Optimizer offload
moves the fp32 master and the AdamW moments to host memory. Activations are an estimate
(per block 34 x tokens x d_model bytes in 16-bit, Korthikanti et al. 2022, twice that in fp32,
plus the training softmax's logits, twice with ``model.transition_residual``); they are not in the measured check.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from model.recommender import training_loss_of
from train.engine import ModelSize, zero_settings

# (replicated, partitioned) bytes per parameter of the model states after a step
STATE_BYTES = {("fp32", 0): (12, 0), ("fp32", 1): (4, 12), ("fp32", 2): (4, 12), ("fp32", 3): (0, 20),
               ("bf16", 0): (14, 0), ("bf16", 1): (2, 12), ("bf16", 2): (2, 12), ("bf16", 3): (0, 16)}
OFFLOADED = 12  # bytes per parameter the optimizer offload moves to the host: fp32 master + AdamW (partitioned)
GiB = 2 ** 30


def weight_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def count_parts(model: torch.nn.Module) -> dict[str, int]:
    """Parameter elements by part: ``item_table`` (the tied item embeddings, the item bias and the
    transition table: a row an item),
    ``embeddings`` (positions, domains), ``encoder`` (the shared and any view encoders), ``heads``."""
    parts = {"item_table": 0, "embeddings": 0, "encoder": 0, "heads": 0}
    for name, p in model.named_parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        if name.startswith(("embedding.item", "transition.")) or name == "item_bias":
            parts["item_table"] += n
        elif name.startswith("embedding."):
            parts["embeddings"] += n
        elif name.startswith("heads."):
            parts["heads"] += n
        else:
            parts["encoder"] += n
    return parts


@dataclass
class Estimate:
    """Predicted bytes of one rank (``device``: where the model trains; ``host``: offloaded)."""

    zero: int
    offload: bool
    params: int
    grads: int
    optimizer: int
    buffers: int
    activations: int
    host: int

    buffers_after_step: int = 0  # the buckets DeepSpeed keeps between steps (ZeRO-3's reduce bucket; ZeRO-1/2 free theirs)

    @property
    def device(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers + self.activations

    @property
    def states(self) -> int:
        """What ``tools.memory`` measures as live tensors after a step: weights, master, moments,
        the ZeRO-3 gradient partition, the kept buckets (on a CPU machine the host is the device)."""
        return self.params + self.optimizer + self.host + (self.grads if self.zero == 3 else 0) \
            + self.buffers_after_step


def estimate(size: ModelSize, *, zero: int, precision: str, world: int, offload: bool,
             activations: int = 0) -> Estimate:
    """Per-rank bytes of ``size`` parameters under ZeRO ``zero`` with ``world`` ranks."""
    prec = "fp32" if precision == "fp32" else "bf16"
    w = weight_bytes(prec)
    n, part = size.params, math.ceil(size.params / world)
    rep, shard = STATE_BYTES[(prec, zero)]
    params = n * w if zero < 3 else part * w
    master_adam = (n * (rep - w) if zero == 0 else part * OFFLOADED)  # Z0: replicated master (bf16) + moments
    grad_keep = part * w if zero == 3 else 0  # ZeRO-3 keeps its gradient partition between steps
    grads = n * w if zero == 0 else (part * w if zero in (1, 2) else grad_keep)
    zs = zero_settings(size, stage=zero, world_size=world, cuda=False)
    bucket = zs["reduce_bucket_size"] * w
    buffers = bucket * (2 if zero in (1, 2) else 1) if zero else 0
    if zero == 3:
        buffers += zs["stage3_max_live_parameters"] * w
    host = master_adam if offload and zero else 0
    return Estimate(zero=zero, offload=offload, params=params, grads=grads,
                    optimizer=0 if host else master_adam, buffers=buffers, activations=activations, host=host,
                    buffers_after_step=bucket if zero == 3 else 0)


def activation_bytes(cfg, n_domain_items: int) -> int:
    """Estimated activations of one training micro batch (see the module docstring)."""
    m, t = cfg.model, cfg.train
    tokens = t.micro_batch_size * m.max_len
    w = weight_bytes(t.precision)
    per_block = 34 * tokens * m.d_model * w // 2 + 5 * m.n_heads * m.max_len * tokens * w // 2
    blocks = m.n_layers * per_block * (1 if not t.activation_checkpointing else 0) + per_block
    candidates = training_loss_of(m, []).columns(n_domain_items, t.micro_batch_size)
    logits = 3 * tokens * candidates * 4  # logits, their softmax and its gradient, in fp32
    ces = 2 if m.transition_residual else 1  # the residual table adds a second CE (it needs the table)
    # train.joint.distill: the teacher's logits and its softmax (no gradient) beside the student's
    teacher = 2 * tokens * candidates * 4 if t.joint.distill else 0
    return blocks + ces * logits + teacher


def parse_bytes(text: str) -> int:
    """'80GiB', '24G', '512MiB', '1e9' -> bytes."""
    units = {"k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(float(t))


def recommend(rows: list[Estimate], memory: int, *, cpu: bool, headroom: float = 0.9) -> Estimate | None:
    """The lowest ZeRO stage that fits ``headroom`` x ``memory`` (no offload first: it costs
    speed). On CPU ranks the host is the device: offloaded bytes count against the same memory."""
    for offload in (False, True):
        for r in rows:
            need = r.device + (r.host if cpu else 0)
            if r.offload == offload and need <= headroom * memory:
                return r
    return None


def default_memory(world: int) -> tuple[int, bool]:
    """(memory per rank, ranks on the CPU): the first GPU's memory, else this machine's RAM / world."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, False
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // world, True


def _mib(b: int) -> str:
    return f"{b / GiB:,.2f} GiB" if b >= GiB else f"{b / 2 ** 20:,.0f} MiB"


def plan(cfg, manifest: dict, *, world: int, memory: int, cpu: bool) -> str:
    """The report ``xdrec plan`` prints: parts, then per precision a row per ZeRO stage and offload."""
    from train.stages import build_model

    with torch.device("meta"):
        model = build_model(cfg, manifest)
    size, parts = ModelSize.of(model), count_parts(model)
    biggest = max(d["n_items"] for d in manifest["domains"])
    lines = [f"{cfg.name}: {size.params:,} parameters ("
             + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in parts.items()) + f"); {world} rank(s) "
             + f"on the {'CPU' if cpu else 'GPU'}, {_mib(memory)} per rank"]
    head = f"{'':<13}{'params':>11}{'grads':>11}{'optimizer':>11}{'buffers':>11}{'activations':>13}" \
           f"{'per rank':>11}{'host':>11}"
    for precision in ("fp32", "bf16"):
        acts = activation_bytes(_with_precision(cfg, precision), biggest)
        rows = [estimate(size, zero=z, precision=precision, world=world, offload=o, activations=acts)
                for o in (False, True) for z in range(4) if not (o and z == 0)]
        lines += ["", f"{precision}{' (fp16 the same)' if precision == 'bf16' else ''}, "
                      f"micro batch {cfg.train.micro_batch_size}:", head]
        for r in rows:
            label = f"ZeRO-{r.zero}" + (" offload" if r.offload else "")
            lines.append(f"{label:<13}" + "".join(f"{_mib(v):>11}" for v in (r.params, r.grads, r.optimizer, r.buffers))
                         + f"{_mib(r.activations):>13}{_mib(r.device):>11}{_mib(r.host):>11}")
        best = recommend(rows, memory, cpu=cpu)
        lines.append(f"recommended for {_mib(memory)} per rank: " + (
            f"ZeRO-{best.zero}{' with optimizer offload' if best.offload else ''} ({_mib(best.device)} "
            "predicted, 10% left for the allocator)" if best else
            f"nothing fits; use more ranks (ZeRO-3 needs {_mib(rows[2].device)} per rank)"))
    return "\n".join(lines)


def _with_precision(cfg, precision: str):
    from dataclasses import replace
    return replace(cfg, train=replace(cfg.train, precision=precision))


def vocabulary(cfg) -> dict:
    """The manifest's domains, prepared or (synthetic data) as the generator will make them."""
    from train.data.prepare import ManifestError, load_manifest

    try:
        return load_manifest(cfg.data.prepared_dir(), verify=False)
    except ManifestError:
        if cfg.data.format != "synthetic":
            raise ManifestError(f"{cfg.data.prepared_dir() / 'manifest.json'}: the vocabulary comes from the prepared "
                                "data; run `xdrec prepare` first") from None
    sizes, offset, doms = cfg.data.synthetic.items_per_domain, 0, []
    for name, n in zip(cfg.data.domains, sizes):
        doms.append({"name": name, "offset": offset, "n_items": n})
        offset += n
    return {"domains": doms}
