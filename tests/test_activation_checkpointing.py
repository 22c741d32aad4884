import pytest
import torch

from marjara.model.config import ModelConfig
from marjara.distributed import ensure_process_group


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_deepspeed_activation_checkpointing_gives_the_same_loss_and_gradients(moe):
    from marjara.train.build import build_model  # what --grad_checkpointing builds

    ensure_process_group()
    config = ModelConfig.from_preset("tiny", vocab_size=64, use_moe=moe, capacity_factor=4.0)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(config, grad_checkpointing=checkpointing, ds_config={}).train()
        assert (model.checkpoint_fn is not None) == checkpointing
        torch.manual_seed(1)  # same gate randomness in both runs
        loss = model(idx, targets=idx).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)
