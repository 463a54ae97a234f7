"""A loss of one's own, the worked example: the focal loss (Lin et al. 2017, "Focal Loss for Dense Object
Detection"), which down-weights the examples the network already gets right.

    python -m mnist_lit fit --config configs/default.yaml --config configs/examples/focal.yaml

The whole change is one method, ``loss``: training (both loops), validation and test all call it through
``MNISTClassifier.model_step``, and the fit keeps the fast path (docs/extending.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat

from mnist_lit.model import MNISTClassifier


class FocalClassifier(MNISTClassifier):
    """``MNISTClassifier`` trained on the focal loss ``-(1 - p_t)^gamma * log p_t``, averaged over the batch.

    Args:
        gamma: the focusing exponent; 0 is cross-entropy, 2 the paper's choice.
        **kwargs: ``MNISTClassifier``'s arguments (network, optimizer, schedule, ...).
    """

    def __init__(self, gamma: NonNegativeFloat = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.gamma = gamma

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)  # (B,) log p of the true class
        return -((1 - log_p.exp()) ** self.gamma * log_p).mean()
