"""Worked examples of extending the template (docs/extending.md), each one LightningModule subclass chosen by
``--model``: focal.py changes the loss, distillation.py the training method (a student against a teacher)."""
