"""predict on a user's own pictures: found by file, glob or folder, made to look like MNIST, written as CSV."""

import csv
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import REAL_MNIST, fit_args, only_run
from mnist_lit.cli import main
from mnist_lit.idx import read_idx
from mnist_lit.images import find_images, load_images, to_mnist


def seven(size: tuple[int, int] = (300, 400), offset: tuple[int, int] = (40, 60), ink: int = 0, paper: int = 255):
    """A hand-drawn-looking 7: dark strokes on light paper by default, off-centre on a large canvas."""
    image = Image.new("L", size, paper)
    x, y = offset
    ImageDraw.Draw(image).line([(x, y), (x + 150, y), (x + 60, y + 250)], fill=ink, width=22)
    return image


def bounding_box(digit: torch.Tensor) -> tuple[int, int]:
    rows, cols = (digit > 0.2 * digit.max()).nonzero().unbind(1)
    return rows.max().item() - rows.min().item() + 1, cols.max().item() - cols.min().item() + 1


def centre_of_mass(digit: torch.Tensor) -> tuple[float, float]:
    d = digit.float()
    grid = torch.arange(28.0)
    return ((d.sum(1) * grid).sum() / d.sum()).item(), ((d.sum(0) * grid).sum() / d.sum()).item()


def test_a_picture_becomes_a_white_digit_scaled_to_20_pixels_and_centred_by_mass():
    digit = to_mnist(seven())
    assert digit.shape == (28, 28) and digit.dtype == torch.uint8
    assert digit.max() == 255 and digit[0].max() == 0 and digit[:, 0].max() == 0  # white ink, black border
    assert max(bounding_box(digit)) in (19, 20, 21)  # the longer side fills MNIST's 20x20 box
    row, col = centre_of_mass(digit)
    assert abs(row - 14) <= 0.5 and abs(col - 14) <= 0.5  # where MNIST's digits have it


@pytest.mark.parametrize("variant", ["light ink on dark", "rgb", "elsewhere and larger", "transparent", "16-bit"])
def test_polarity_colour_size_position_and_transparency_do_not_change_the_digit(variant: str):
    reference = to_mnist(seven()).float()
    if variant == "light ink on dark":
        picture = seven(ink=230, paper=20)
    elif variant == "rgb":
        picture = Image.merge("RGB", [seven()] * 3)
    elif variant == "elsewhere and larger":
        picture = seven(size=(900, 700), offset=(500, 300)).resize((1800, 1400))
    elif variant == "transparent":  # dark strokes on a transparent background, as drawing apps export them
        picture = Image.new("LA", (300, 400), (0, 0))
        picture.putalpha(Image.eval(seven(), lambda v: 255 - v))
    else:  # a 16-bit scan, values 0..65535
        picture = Image.fromarray(numpy.asarray(seven(), dtype=numpy.uint16) * 257)
        assert picture.mode.startswith("I;16")
    difference = (to_mnist(picture).float() - reference).abs().mean() / reference.mean()
    assert difference < 0.15, f"{variant}: mean difference {difference:.2f} of the mean ink"


def test_a_blank_picture_is_refused_by_name(tmp_path: Path):
    Image.new("RGB", (50, 50), (240, 240, 240)).save(tmp_path / "blank.png")
    paths, images, problems = load_images([str(tmp_path / "blank.png")])
    assert paths == [] and images.shape == (0, 28, 28)
    assert problems == [(str(tmp_path / "blank.png"), "no digit found: the image is (nearly) one flat colour")]


def test_files_globs_and_folders_are_expanded_in_order_and_what_matches_nothing_is_named(tmp_path: Path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / "pics" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "pics" / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    found, problems = find_images([str(tmp_path / "pics"), str(tmp_path / "pics" / "*.png"), str(tmp_path / "empty"),
                                   str(tmp_path / "*.gif"), str(tmp_path / "nope.png")])
    assert found == [tmp_path / "pics" / "a.jpg", tmp_path / "pics" / "b.png"]  # folder: images only, once each
    assert [reason for _, reason in problems] == [
        "the folder holds no image file (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp)",
        "the pattern matches no file", "no such file or folder"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run trained for 2 epochs on the tiny written data set: (data root, last.ckpt)."""
    from conftest import write_mnist

    root = tmp_path_factory.mktemp("predict")
    data = write_mnist(root / "data")
    main(fit_args(data, root / "logs", "--trainer.max_epochs", "2"))
    return data, only_run(root / "logs") / "checkpoints" / "last.ckpt"


def predict_args(checkpoint: Path, logs: Path, *extra: str) -> list[str]:
    return ["predict", "--ckpt_path", str(checkpoint),  # the checkpoint carries its run's config
            "--trainer.logger.init_args.save_dir", str(logs), "--trainer.enable_progress_bar", "false",
            "--data.data_dir", str(logs / "no-data-needed"), "--data.download", "false", *extra]


def test_predict_writes_csv_and_table_and_names_the_unreadable_ones(trained, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture):
    _, checkpoint = trained
    pictures = tmp_path / "mine"
    pictures.mkdir()
    seven().save(pictures / "seven.png")
    Image.merge("RGB", [seven(ink=200, paper=30)] * 3).save(pictures / "seven-dark.jpg")
    (pictures / "broken.png").write_bytes(b"not really a png")
    with pytest.raises(SystemExit) as stop:
        main(predict_args(checkpoint, tmp_path / "logs", "--data.predict_images",
                          f"[{pictures}, {tmp_path / 'missing'}/*.png]"))
    message = str(stop.value.code)
    assert message.startswith("error: 2 of --data.predict_images could not be predicted: ")
    assert f"{pictures / 'broken.png'} (cannot identify image file" in message
    assert f"{tmp_path / 'missing'}/*.png (the pattern matches no file)" in message
    assert "The other 2 were predicted" in message
    with (only_run(tmp_path / "logs") / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(pictures / "seven-dark.jpg"), str(pictures / "seven.png")]
    assert list(rows[0]) == ["path", "label", "predicted", "probability", *(f"p_{d}" for d in range(10))]
    for row in rows:
        probabilities = [float(row[f"p_{d}"]) for d in range(10)]
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert float(row["probability"]) == max(probabilities) and row["predicted"] == str(probabilities.index(
            max(probabilities)))
    table = capsys.readouterr().out
    assert "image" in table and "predicted" in table and str(pictures / "seven.png") in table


def test_predict_without_any_readable_image_fails_before_writing(trained, tmp_path: Path):
    _, checkpoint = trained
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"error: --data.predict_images yielded no readable image: .*empty \(the "
                                         r"folder holds no image file"):
        main(predict_args(checkpoint, tmp_path / "logs", "--data.predict_images", str(tmp_path / "empty")))
    assert not list(tmp_path.glob("logs/*/*/predictions.csv"))


def test_predict_without_images_writes_the_test_set_with_its_labels(trained, tmp_path: Path):
    data, checkpoint = trained
    main(predict_args(checkpoint, tmp_path / "logs", "--data.data_dir", str(data), "--data.verify_checksums", "false",
                      "--data.val_size", "100"))
    with (only_run(tmp_path / "logs") / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200 and rows[7]["path"] == "t10k/7"
    assert sum(r["label"] == r["predicted"] for r in rows) / len(rows) > 0.9


def real_test_digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = (REAL_MNIST / f"t10k-{kind}-idx{d}-ubyte.gz" for kind, d in (("images", 3), ("labels", 1)))
    if not images.is_file():
        pytest.skip(f"real MNIST not found at {REAL_MNIST} (the shared data folder beside the repo)")
    return read_idx(images)[:n], read_idx(labels)[:n].long()


def photographed(digit: torch.Tensor, index: int) -> Image.Image:
    """A real MNIST digit as a user might hand it over: enlarged, off-centre, and half of them dark-on-light RGB."""
    g = torch.Generator().manual_seed(index)
    factor = int(torch.randint(3, 12, (1,), generator=g))
    big = Image.fromarray(digit.numpy()).resize((28 * factor, 28 * factor), Image.BICUBIC)
    canvas = Image.new("L", (28 * factor + 90, 28 * factor + 50), 0)
    canvas.paste(big, tuple(int(v) for v in torch.randint(0, 50, (2,), generator=g)))
    return Image.merge("RGB", [Image.eval(canvas, lambda v: 250 - v * 0.9)] * 3) if index % 2 else canvas


def similarity(prepared: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(prepared.float().flatten(1), digits.float().flatten(1))


def test_mnists_own_digits_pass_through_unchanged():
    digits, _ = real_test_digits(200)  # already 20x20 in 28x28 with the mass at (14, 14): nothing to do
    scores = similarity(torch.stack([to_mnist(Image.fromarray(d.numpy())) for d in digits]), digits)
    # A few have faint edges below the ink threshold, so their box is cropped a pixel tighter and rescaled.
    assert scores.median() > 0.999 and (scores > 0.99).float().mean() >= 0.98


def test_real_digits_handed_over_as_pictures_come_back_as_the_digits():
    digits, _ = real_test_digits(60)
    prepared = torch.stack([to_mnist(photographed(d, i)) for i, d in enumerate(digits)])
    scores = similarity(prepared, digits)  # resampling twice blurs thin strokes, shifts them by subpixels
    assert scores.median() > 0.95 and scores.min() > 0.7


@pytest.mark.slow
def test_a_model_trained_on_mnist_reads_real_digits_handed_over_as_pictures(real_mnist: Path, tmp_path: Path):
    digits, labels = real_test_digits(100)
    for i, d in enumerate(digits):
        photographed(d, i).save(tmp_path / f"{i:03d}.{'png' if i % 3 else 'jpg'}")
    main(fit_args(real_mnist, tmp_path / "fit", "--trainer.max_epochs", "3", "--data.batch_size", "128",
                  "--data.val_size", "5000", "--trainer.log_every_n_steps", "50"))
    checkpoint = only_run(tmp_path / "fit") / "checkpoints" / "last.ckpt"
    main(predict_args(checkpoint, tmp_path / "predict", "--data.predict_images", str(tmp_path)))
    with (only_run(tmp_path / "predict") / "predictions.csv").open() as f:
        predicted = torch.tensor([int(r["predicted"]) for r in csv.DictReader(f)])
    assert (predicted == labels).float().mean() > 0.93  # the model scores ~0.975 on the untouched digits


def test_a_predict_step_without_probabilities_gets_a_notice_and_no_csv(tiny_mnist: Path, tmp_path: Path, caplog):
    """PredictionWriter steps aside for a module's own predict_step that returns something else, saying what."""
    main(fit_args(tiny_mnist, tmp_path / "fit", "--trainer.max_epochs", "1", "--test_after_fit", "false",
                  "--model", "research_modules.ClassPredictions"))
    checkpoint = only_run(tmp_path / "fit") / "checkpoints" / "last.ckpt"
    with caplog.at_level("INFO"):
        main(predict_args(checkpoint, tmp_path / "logs", "--data.data_dir", str(tiny_mnist),
                          "--data.verify_checksums", "false"))
    assert "predictions.csv steps aside: ClassPredictions.predict_step returns a tensor of shape (200,)" in caplog.text
    assert not (only_run(tmp_path / "logs") / "predictions.csv").exists()
