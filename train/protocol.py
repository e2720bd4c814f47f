"""What a metric depends on: the protocol names and the eval.* fields recorded with every result.
A module of its own so records, checkpoints and reports need not import the evaluator."""
from __future__ import annotations

from train.config import EvalConfig

SAMPLED = "sampled999"  # the key in metrics.json, whatever ``eval.num_negatives`` is
PROTOCOLS = ("full", SAMPLED)  # every result holds both, in this order
# What `xdrec evaluate --without` can take out of each input (train.evaluate.without)
ABLATIONS = ("last-event", "other-domains")
# The eval.* fields the sampled numbers depend on, recorded in metrics.json as ``_meta.eval``: runs,
# resumed stages and a carried-over source stage compare only when these agree.
PROTOCOL_FIELDS = ("num_negatives", "seed", "prior", "transition", "exclude_history")
# A protocol field recorded after runs were made, with the value those runs were evaluated under
# where it differs from today's default: full ranking kept the history in before exclude_history.
LEGACY_PROTOCOL = {"exclude_history": False}


def sampled_protocol(ev: EvalConfig) -> dict:
    """``{"num_negatives": N, "seed": S, "prior": W, "transition": V}``: what an eval config's
    metrics depend on."""
    return {k: getattr(ev, k) for k in PROTOCOL_FIELDS}


def recorded_protocol(recorded: dict) -> dict:
    """A metrics.json's ``_meta.eval`` with every protocol field: one recorded after that run was
    made counts as the value that run was evaluated with (its default then, :data:`LEGACY_PROTOCOL`)."""
    return {**sampled_protocol(EvalConfig()), **LEGACY_PROTOCOL, **recorded}


def protocol_label(protocol: str, num_negatives: int) -> str:
    """How logs name a protocol: ``full``, or ``sampled (N negatives)`` with the configured N (the
    metrics.json key ``sampled999`` keeps its name for every N)."""
    return f"sampled ({num_negatives} negatives)" if protocol == SAMPLED else protocol
