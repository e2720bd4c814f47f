"""Launcher-facing side: who am I (single process, torchrun, accelerate, srun), which device."""
from launch.env import DistEnv, detect

__all__ = ["DistEnv", "detect"]
