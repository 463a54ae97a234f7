"""The MLP's dropout: on while training, off at evaluation, and at 0 the very network it was without it."""

import torch

from mnist_lit.model import MLP


def test_without_dropout_the_mlp_is_its_plain_layers_with_the_same_checkpoint_keys():
    torch.manual_seed(0)
    net, x = MLP(64, 32), torch.rand(16, 784)
    assert list(net.state_dict()) == [f"layers.{i}.{p}" for i in (1, 3, 5) for p in ("weight", "bias")]
    state = torch.random.get_rng_state()
    assert torch.equal(net(x), net.layers(x))
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn: later draws stay where they were


def test_dropout_drops_that_fraction_of_the_hidden_units_while_training_and_none_at_evaluation():
    torch.manual_seed(0)
    plain, dropped = MLP(512, 512), MLP(512, 512, dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.rand(64, 784)
    plain.eval(), dropped.eval()
    assert torch.equal(dropped(x), plain(x))  # evaluation: every unit
    dropped.train()
    seen = {}
    dropped.layers[3].register_forward_pre_hook(lambda module, inputs: seen.update(hidden=inputs[0]))
    first = dropped(x)
    assert not torch.equal(first, dropped(x))  # other units each time
    units = torch.relu(dropped.layers[1](x))  # the first hidden layer before dropout
    live, kept = units > 0, seen["hidden"] != 0
    assert 0.45 < 1 - kept.sum().item() / live.sum().item() < 0.55  # half of the live units dropped
    torch.testing.assert_close(seen["hidden"][kept], units[kept] * 2)  # the rest scaled by 1 / (1 - 0.5)
    inputs = {}
    with_input = MLP(512, 512, input_dropout=0.2)
    with_input.layers[1].register_forward_pre_hook(lambda module, args: inputs.update(pixels=args[0]))
    with_input(x)
    assert 0.17 < (inputs["pixels"] == 0).float().mean().item() < 0.23  # a fifth of the pixels
