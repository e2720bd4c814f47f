"""``python -m train.engine``: build DeepSpeed's CPU comm op once (the Makefile's set-up)."""
from train.engine import warm_ops

warm_ops()
