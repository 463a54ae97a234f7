"""Knowledge distillation (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network"): a
student network trained to match a frozen teacher's softened probabilities as well as the labels.

    python -m mnist_lit fit --config configs/default.yaml --config configs/experiment/mlp_99.yaml   # the teacher
    python -m mnist_lit fit --config configs/default.yaml --config configs/examples/distill.yaml \\
        --model.teacher_checkpoint logs/mnist/version_0/checkpoints/last.ckpt

The teacher is any checkpoint mnist_lit wrote (its module rebuilt from the config the checkpoint carries),
loaded when a fit starts, frozen and kept out of the student's parameters, optimizer and checkpoints: those
hold the student alone, so ``test``, ``predict`` and ``export`` of a student need no teacher. A resume
loads the teacher again from ``teacher_checkpoint``. Validation and test report the student's plain
cross-entropy and accuracy, comparable with any other run's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveFloat

from mnist_lit.checkpoints import CheckpointError, load_checkpoint, rebuild_module
from mnist_lit.model import MNISTClassifier, network
from mnist_lit.trust import trusted_packages


class Distillation(MNISTClassifier):
    """The student (``net``) trained on ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)``,
    both softmaxes at temperature ``T``. It keeps the fast path: the whole change is ``model_step``.

    Args:
        teacher_checkpoint: a checkpoint of a trained module (e.g. ``<run>/checkpoints/last.ckpt``), the teacher.
        temperature: T, the softening of both networks' softmax in the distillation term.
        alpha: weight of the distillation term; ``1 - alpha`` weighs the cross-entropy with the labels.
        trust_imports: the packages (comma-separated) that the teacher's checkpoint may import beyond the vouched
            ones (``mnist_lit.trust``): a teacher from elsewhere that names code of its own is refused without it.
        **kwargs: ``MNISTClassifier``'s arguments; its ``net`` is the student.
    """

    def __init__(self, teacher_checkpoint: str, temperature: PositiveFloat = 4.0, alpha: float = 0.9,
                 trust_imports: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
        self.teacher_checkpoint, self.temperature, self.alpha = teacher_checkpoint, temperature, alpha
        self.trust_imports = trust_imports
        self.__dict__["teacher"] = None  # not a submodule: out of parameters(), state_dict() and .train()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.teacher is None:
            self.check_teacher_data()
            module = rebuild_module(self.teacher_checkpoint, trusted_packages(self.trust_imports))
            teacher = network(module).eval().requires_grad_(False)
            self.__dict__["teacher"] = teacher

    def check_teacher_data(self) -> None:
        """The teacher must have seen the pixels the student sees: the same data set and normalization."""
        theirs = load_checkpoint(self.teacher_checkpoint).get("datamodule_hyper_parameters", {})
        ours = getattr(self.trainer.datamodule, "hparams", {})
        differ = [f"{key} ({theirs.get(key)!r} there, {ours.get(key)!r} here)" for key in ("dataset", "standardize")
                  if key in ours and theirs.get(key, ours[key]) != ours[key]]
        if differ:
            raise CheckpointError(f"The teacher {self.teacher_checkpoint} was trained on other inputs than this "
                                  f"student: {'; '.join(differ)}. Train the student with the teacher's data settings, "
                                  "or give a teacher trained with these.")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.to(self.device)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.training:  # validation and test: the student's own cross-entropy
            return super().model_step(batch)
        x, y = batch
        logits = self(x)  # (B, 784) -> (B, 10), the student
        with torch.no_grad():
            soft_targets = F.log_softmax(self.teacher(x) / self.temperature, dim=1)  # (B, 10)
        distill = F.kl_div(F.log_softmax(logits / self.temperature, dim=1), soft_targets, log_target=True,
                           reduction="batchmean") * self.temperature ** 2  # T^2 keeps its gradients' scale
        loss = self.alpha * distill + (1 - self.alpha) * self.loss(logits, y)
        return loss, logits, y
