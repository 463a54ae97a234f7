"""A checkpoint -> one deployable file that maps raw pixels to class probabilities, checked against the checkpoint.

    python -m mnist_lit.export logs/mnist/version_0/checkpoints/last.ckpt                # -> last.onnx
    python -m mnist_lit.export logs/mnist/version_0/checkpoints/last.ckpt --format pt2   # torch.export

The artifact takes ``pixels``, float32 (B, 28, 28) with MNIST's values 0..255 (white digit on
black; ``mnist_lit.images.to_mnist`` prepares other pictures), applies the normalization the
model was trained with (stored in the checkpoint), and returns ``probabilities`` (B, 10). Any
batch size works. ONNX needs ``pip install onnx onnxscript onnxruntime`` (the ``export`` extra).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn

from mnist_lit.checkpoints import DEFAULT_DATA, CheckpointError, load_checkpoint, rebuild_module
from mnist_lit.model import network
from mnist_lit.trust import TRUST_OPTION, UntrustedImports, trusted_packages

TOLERANCE = 1e-5  # largest |artifact - checkpoint| accepted on the check batch


class PixelsToProbabilities(nn.Module):
    """The trained network behind its input normalization and a softmax: what a deployment calls."""

    def __init__(self, net: nn.Module, scale: float, shift: float):
        super().__init__()
        self.net, self.scale, self.shift = net, scale, shift

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.reshape(pixels.shape[0], 28 * 28) * self.scale + self.shift  # (B, 784), as in data.py
        return self.net(x).softmax(dim=1)  # (B, 10)


def from_checkpoint(path: str, trust_imports: str | None = None) -> PixelsToProbabilities:
    """The checkpoint's network (its module rebuilt from the recorded class_path/init_args) with its
    normalization. MNISTClassifier's is its ``net``; another module's is the module itself, its forward."""
    checkpoint = load_checkpoint(path)
    data = yaml.safe_load(checkpoint.get("run_config") or "{}").get("data") or {}
    data_class = data.get("class_path", DEFAULT_DATA)
    if data_class != DEFAULT_DATA:
        raise CheckpointError(f"{path} was trained on --data {data_class}, and export takes checkpoints of "
                              f"{DEFAULT_DATA} (28x28 pixels, their normalization recorded): the artifact's input "
                              "shape and scaling for another data module are not known to it yet. Export that "
                              "network with torch.export or torch.onnx yourself (docs/extending.md).")
    with warnings.catch_warnings():  # "net is an nn.Module, saved twice": by design, the CLI records its class_path
        warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
        model = rebuild_module(path, trusted_packages(trust_imports))
    data = checkpoint.get("datamodule_hyper_parameters", {})
    stored = checkpoint.get("MNISTDataModule", {}).get("normalization")
    if stored is None and data.get("standardize"):
        raise CheckpointError(f"{path} was trained with --data.standardize true but does not record the mean and "
                              "std it used (it predates mnist_lit storing them). Export a checkpoint written by a "
                              "newer run, or retrain.")
    scale, shift = stored or (1 / 255, 0.0)
    return PixelsToProbabilities(network(model), scale, shift).eval()


def export(module: PixelsToProbabilities, output: Path, fmt: str) -> None:
    example = (torch.rand(2, 28, 28) * 255,)
    batch = torch.export.Dim("batch", min=1)
    if fmt == "onnx":
        try:
            import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; onnx comes with it)
        except ImportError:
            sys.exit("error: --format onnx needs the onnx packages: pip install onnx onnxscript onnxruntime "
                     "(or pip install -e '.[export]'), or use --format pt2 (torch.export, no extra package).")
        program = torch.onnx.export(module, example, dynamo=True, input_names=["pixels"],
                                    output_names=["probabilities"], dynamic_shapes=({0: batch},), verbose=False)
        program.save(str(output))
    else:
        torch.export.save(torch.export.export(module, example, dynamic_shapes=({0: batch},)), str(output))


def run_artifact(path: Path, pixels: torch.Tensor) -> torch.Tensor:
    """The artifact's probabilities for (B, 28, 28) pixels: onnxruntime for .onnx, torch for .pt2."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"pixels": pixels.numpy()})[0])
    return torch.export.load(str(path)).module()(pixels)


def main(args: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(prog="python -m mnist_lit.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt written by fit, e.g. logs/mnist/version_0/checkpoints/last.ckpt")
    parser.add_argument("--format", choices=["onnx", "pt2"], default="onnx")
    parser.add_argument("--output", help="the artifact's path (default: the checkpoint's, with .onnx or .pt2)")
    parser.add_argument(TRUST_OPTION, metavar="PACKAGES", help="the packages (comma-separated) that the checkpoint's "
                        "stored config may import beyond the vouched ones (README, 'When things go wrong')")
    options = parser.parse_args(args)
    output = Path(options.output or Path(options.checkpoint).with_suffix(f".{options.format}"))
    try:
        module = from_checkpoint(options.checkpoint, options.trust_imports)
    except (CheckpointError, UntrustedImports) as err:
        sys.exit(f"error: {err}")
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        export(module, output, options.format)
        pixels = torch.randint(0, 256, (64, 28, 28), generator=torch.Generator().manual_seed(0)).float()
        difference = (run_artifact(output, pixels) - module(pixels)).abs().max().item()
    print(f"Wrote {output}: pixels (B, 28, 28) 0..255 -> probabilities (B, 10); largest difference from the "
          f"checkpoint on 64 random images: {difference:.2e}")
    if difference > TOLERANCE:
        sys.exit(f"error: {output} differs from {options.checkpoint} by {difference:.2e} (> {TOLERANCE}); do not "
                 "deploy it. Try the other --format, and report the versions of torch and onnxruntime.")
    return difference


if __name__ == "__main__":
    main()
