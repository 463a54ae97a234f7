"""The model learns: its optimizer is Nesterov SGD as written in the textbook, on real digits it lowers the
loss and overfits a small batch, and it predicts probabilities."""

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mnist_lit.idx import read_split
from mnist_lit.model import MLP, MNISTClassifier


@pytest.fixture(scope="module")
def real_batch(real_mnist: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 256 real training digits: not separable by a single bright band, unlike the tiny test data."""
    images, labels = read_split(real_mnist / "MNIST" / "raw", "train", verify=True)
    return images[:256].flatten(1).float() / 255, labels[:256]


def sgd_steps(model: MNISTClassifier, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    optimizer = model.configure_optimizers()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_network_maps_pixels_to_ten_logits():
    torch.manual_seed(0)
    net = MLP(hidden1=32, hidden2=16)
    assert net(torch.rand(5, 784)).shape == (5, 10)
    assert net(torch.rand(5, 28, 28)).shape == (5, 10)
    assert [m.out_features for m in net.layers if isinstance(m, torch.nn.Linear)] == [32, 16, 10]


def test_the_optimizer_is_nesterov_sgd_with_weight_decay_as_written(real_batch):
    # v <- mu v + (g + wd p);  p <- p - lr (g + wd p + mu v): any other update rule drifts away within steps.
    torch.manual_seed(0)
    optimizer = partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    model = MNISTClassifier(optimizer=optimizer, lr_scheduler=None)
    params = [p.detach().clone() for p in model.parameters()]
    velocity = [torch.zeros_like(p) for p in params]
    x, y = real_batch
    sgd_steps(model, x, y, steps=20)
    for _ in range(20):
        net = [p.clone().requires_grad_() for p in params]
        h = torch.relu(x @ net[0].T + net[1])
        h = torch.relu(h @ net[2].T + net[3])
        grads = torch.autograd.grad(F.cross_entropy(h @ net[4].T + net[5], y), net)
        for p, v, g in zip(params, velocity, grads, strict=True):
            g = g + 1e-3 * p
            v.mul_(0.9).add_(g)
            p.sub_(0.1 * (g + 0.9 * v))
    for ours, reference in zip(model.parameters(), params, strict=True):
        # float32 sums in another order than torch's kernels: equal to rounding, not bit for bit
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_a_few_steps_lower_the_loss_on_real_digits(real_batch):
    torch.manual_seed(0)
    losses = sgd_steps(MNISTClassifier(lr_scheduler=None), *real_batch, steps=20)
    assert losses[0] > 2.0 and losses[-1] < 0.3 * losses[0]  # from chance (ln 10 = 2.3) to 0.5 here


def test_overfits_a_small_batch_of_real_digits(real_batch):
    torch.manual_seed(0)
    model = MNISTClassifier(optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True), lr_scheduler=None)
    x, y = real_batch[0][:32], real_batch[1][:32]
    losses = sgd_steps(model, x, y, steps=60)
    assert losses[-1] < 0.01
    assert torch.equal(model(x).argmax(1), y)


def test_predict_returns_class_probabilities(real_batch):
    torch.manual_seed(0)
    model = MNISTClassifier()
    x, y = real_batch[0][:8], real_batch[1][:8]
    probs = model.predict_step((x, y))
    assert probs.shape == (8, 10) and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(8))
    torch.testing.assert_close(probs, model(x).softmax(1))
