"""Pure-torch model code: no ranks, devices, DeepSpeed, argparse or file I/O here."""
from model.config import ModelConfig, Vocabulary
from model.embeddings import SequenceEmbedding
from model.encoder import Encoder
from model.losses import SoftTargets, domain_ce_sums, domain_cross_entropy, weighted_domain_mean
from model.recommender import Recommender, build_recommender

__all__ = ["ModelConfig", "Vocabulary", "SequenceEmbedding", "Encoder", "Recommender", "build_recommender",
           "domain_cross_entropy", "domain_ce_sums", "weighted_domain_mean", "SoftTargets"]
