import pytest
import torch
from torch.utils.checkpoint import checkpoint

from model.dropout import Dropout


def test_training_zeroes_a_share_p_and_scales_the_rest_by_one_over_one_minus_p():
    torch.manual_seed(0)
    x = torch.rand(200_000) + 1  # no element is 0 before dropout
    for p in (0.5, 0.3, 0.1):
        y = Dropout(p).train()(x)
        zero = y == 0
        # binomial: sd of the share is sqrt(p (1 - p) / n) < 0.0012; 5 sd
        assert zero.float().mean().item() == pytest.approx(p, abs=0.006)
        assert torch.allclose(y[~zero], x[~zero] / (1 - p), rtol=1e-4)


def test_evaluation_and_p_zero_are_the_identity():
    x = torch.randn(4, 5, 8)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


def test_the_gradient_is_the_kept_mask_times_the_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 32, requires_grad=True)
    y = Dropout(0.5).train()(x)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.equal(x.grad, kept.float() * 2.0)


def test_a_seed_reproduces_the_masks_and_bf16_inputs_stay_bf16():
    x = torch.ones(16, 16, dtype=torch.bfloat16)
    torch.manual_seed(3)
    a = Dropout(0.5).train()(x)
    torch.manual_seed(3)
    b = Dropout(0.5).train()(x)
    assert torch.equal(a, b) and a.dtype == torch.bfloat16
    assert not torch.equal(a, Dropout(0.5).train()(x))  # the next draw differs


def test_activation_checkpointing_recomputes_the_same_mask():
    """The backward of a checkpointed block recomputes its forward: it must draw the forward's mask."""
    torch.manual_seed(4)
    drop = Dropout(0.5).train()
    x = torch.randn(32, 16, requires_grad=True)
    y = checkpoint(lambda t: drop(t) * 3, x, use_reentrant=False)
    kept = y.detach() != 0
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * 6.0)


def test_p_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"in \[0, 1\), got 1"):
        Dropout(1)
