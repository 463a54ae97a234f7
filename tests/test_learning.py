"""The model learns: SGD on cross-entropy lowers the loss, overfits a small batch, predicts probabilities."""

import torch
import torch.nn.functional as F

from conftest import learnable_digits
from mnist_lit.model import MLP, MNISTClassifier


def fixed_batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = learnable_digits(n, seed=5)
    return images.flatten(1).float() / 255, labels.long()


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


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    losses = sgd_steps(MNISTClassifier(lr=0.1, lr_schedule="constant"), *fixed_batch(), steps=10)
    assert losses[-1] < 0.8 * losses[0]


def test_overfits_a_small_batch():
    torch.manual_seed(0)
    model = MNISTClassifier(net=None, lr=0.05, lr_schedule="constant")
    x, y = fixed_batch(32)
    losses = sgd_steps(model, x, y, steps=60)
    assert losses[-1] < 0.01
    assert torch.equal(model(x).argmax(1), y)


def test_predict_returns_class_probabilities():
    torch.manual_seed(0)
    model = MNISTClassifier()
    x, y = fixed_batch(8)
    probs = model.predict_step((x, y))
    assert probs.shape == (8, 10) and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(8))
    torch.testing.assert_close(probs, model(x).softmax(1))
