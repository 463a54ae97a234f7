"""What a person sees in TensorBoard: the event files of a real short run, read back by TensorBoard's own
reader and served by a real `tensorboard` process over HTTP."""

import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import fit_args, free_port, only_run, read_events, scalar
from mnist_lit.cli import main
from mnist_lit.report import BLUES, confusion_image, misclassified_image

SCALARS = ["train/loss", "train/loss_epoch", "train/acc", "train/lr", "train/samples_per_s", "val/loss", "val/acc",
           "val/acc_best", "test/loss", "test/acc"]


@pytest.fixture(scope="module")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 epochs at a small constant lr (so that some validation digits stay misclassified), histograms on."""
    from conftest import write_mnist

    root = tmp_path_factory.mktemp("report")
    data = write_mnist(root / "data")
    main(fit_args(data, root / "logs", "--trainer.max_epochs", "3", "--model.optimizer.init_args.lr", "0.003",
                  "--model.lr_scheduler", "null", "--report.histograms", "true"))
    return only_run(root / "logs")


def matrix_from_markdown(text: str) -> list[list[int]]:
    return [[int(c) for c in line.strip("|").split("|")[1:]] for line in text.splitlines()[2:]]


def test_scalars_exist_with_sane_values(report_run: Path):
    events = read_events(report_run)
    tags = set(events.Tags()["scalars"])
    assert set(SCALARS) <= tags
    assert {f"{stage}/acc_per_class/{d}" for stage in ("val", "test") for d in range(10)} <= tags
    for tag in SCALARS:
        assert all(math.isfinite(v) for v in scalar(events, tag)), tag
    for tag in ("train/acc", "val/acc", "val/acc_best", "test/acc", "val/acc_per_class/3"):
        assert all(0 <= v <= 1 for v in scalar(events, tag)), tag
    assert scalar(events, "train/loss_epoch")[-1] < scalar(events, "train/loss_epoch")[0]
    assert scalar(events, "val/loss")[-1] < scalar(events, "val/loss")[0]
    assert scalar(events, "train/lr") and all(lr == pytest.approx(0.003) for lr in scalar(events, "train/lr"))
    assert len(scalar(events, "train/samples_per_s")) == 3 and min(scalar(events, "train/samples_per_s")) > 100


def test_images_confusion_matrices_and_histograms(report_run: Path):
    events = read_events(report_run)
    images = set(events.Tags()["images"])
    assert {"val/inputs", "val/misclassified", "val/confusion_matrix", "test/confusion_matrix"} <= images
    assert len(events.Images("val/confusion_matrix")) == 3  # one per validation epoch, none for the sanity check
    assert len(events.Images("val/inputs")) == 1  # once per run
    grid = events.Images("val/inputs")[0]
    assert grid.width > 8 * 28 and grid.height > 28
    val_matrix, test_matrix = (
        matrix_from_markdown(events.Tensors(f"{stage}/confusion_matrix/text_summary")[-1].tensor_proto.string_val[0]
                             .decode()) for stage in ("val", "test"))
    assert sum(map(sum, val_matrix)) == 100 and sum(map(sum, test_matrix)) == 200  # the whole sets, once
    correct = sum(val_matrix[d][d] for d in range(10))
    assert correct / 100 == pytest.approx(scalar(events, "val/acc")[-1])
    assert {"weights/net.layers.1.weight", "gradients/net.layers.1.weight"} <= set(events.Tags()["histograms"])


def test_report_can_be_switched_down(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "1", "--report.misclassified", "0"))
    events = read_events(only_run(tmp_path / "logs"))
    assert "val/misclassified" not in events.Tags()["images"]
    assert not events.Tags()["histograms"]


def pixels_of(image: torch.Tensor, colour: list[int]) -> int:
    return int((image.permute(1, 2, 0) == torch.tensor(colour, dtype=torch.uint8)).all(-1).sum())


def test_confusion_picture_shades_each_cell_by_its_count():
    cell = 36
    matrix = torch.diag(torch.full((10,), 500))  # every digit right: ten darkest cells, ninety empty ones
    image = confusion_image(matrix, [str(d) for d in range(10)], cell=cell)
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and image.shape[1] > 10 * cell
    darkest, lightest = BLUES[-1].int().tolist(), BLUES[0].int().tolist()
    assert 10 * cell * cell * 0.8 < pixels_of(image, darkest) <= 10 * cell * cell  # less the printed counts
    assert pixels_of(image, lightest) == 90 * cell * cell  # an empty cell has no number in it
    wider = confusion_image(matrix, ["a class with a long name"] * 10, cell=cell)
    assert wider.shape[2] > image.shape[2]  # the names and accuracies get room beside the rows


def test_misclassified_picture_is_a_captioned_grid_of_the_digits():
    digits = torch.zeros(10, 1, 28, 28)  # black digits: only the captions are coloured
    image = misclassified_image(digits, torch.arange(10), torch.arange(10).flip(0), scale=3)
    assert image.shape == (3, (2 * 30 + 2) * 3, (8 * 30 + 2) * 3)  # 8 a row, make_grid's 2 px padding, 3x
    caption = image.permute(1, 2, 0).int()
    orange = (caption[..., 0] > 200) & (caption[..., 1] < 150) & (caption[..., 2] < 80)
    rows_with_text = orange.any(1).nonzero().flatten()
    assert rows_with_text.min() < 30 * 3 < rows_with_text.max()  # captions on both rows of digits


def get(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_serves_the_runs_scalars_hparams_and_images(report_run: Path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(report_run),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        deadline = time.monotonic() + 60
        while True:  # the server needs a few seconds to start and to load the event files
            try:
                scalar_tags = get(f"{base}/scalars/tags")
                if scalar_tags.get(".", {}).get("val/acc"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "tensorboard did not serve the run within 60 s"
            time.sleep(0.5)
        assert set(SCALARS) <= set(scalar_tags["."])
        points = get(f"{base}/scalars/scalars?run=.&tag=val/acc")
        assert len(points) == 3 and all(0 <= p[2] <= 1 for p in points)  # [wall time, step, value]
        experiment = get(f"{base}/hparams/experiment", {"experimentName": ""})
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert {"optimizer/init_args/lr", "batch_size", "net/init_args/hidden1"} <= hparams
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} >= {"hp/val_acc_best", "hp/test_acc"}
        assert {"val/inputs", "val/misclassified", "val/confusion_matrix"} <= set(get(f"{base}/images/tags")["."])
    finally:
        server.terminate()
        server.wait(timeout=10)
