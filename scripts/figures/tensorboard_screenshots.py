"""Screenshots of TensorBoard showing a real MNIST run, as a person sees it in a browser.

    python scripts/figures/tensorboard_screenshots.py                   # trains 4 epochs on real MNIST first
    python scripts/figures/tensorboard_screenshots.py --logdir logs/mnist/version_0

Starts `tensorboard` on 127.0.0.1 and Debian's headless Chromium (`apt-get install chromium`),
and writes docs/tensorboard-{scalars,images,hparams}.png.
"""

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
PAGES = {"scalars": "#scalars&tagFilter=val%2F%7Ctrain%2F(loss%7Cacc%7Clr)", "images": "#images",
         "hparams": "#hparams"}


def train(mnist: Path, work: Path) -> Path:
    raw = work / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in mnist.glob("*-ubyte.gz"):
        shutil.copyfile(source, raw / source.name)
    subprocess.run([sys.executable, "-m", "mnist_lit", "fit", "--config", "configs/default.yaml",
                    "--data.data_dir", str(work / "data"), "--trainer.max_epochs", "4",
                    "--trainer.logger.init_args.save_dir", str(work / "logs"),
                    "--trainer.enable_progress_bar", "false"],
                   cwd=REPO, check=True)
    return next((work / "logs").glob("mnist/version_*"))


def serve(logdir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
                               "127.0.0.1", "--port", str(port)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=2)
            return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    sys.exit("tensorboard did not start within 60 s")


def screenshot(chromium: str, url: str, out: Path, size: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        "--virtual-time-budget=20000", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=120)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, help="a run folder; default: train one on real MNIST first")
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "datasets" / "mnist")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or sys.exit("needs Chromium: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as work:
        logdir = args.logdir or train(args.mnist, Path(work))
        server, url = serve(logdir)
        try:
            time.sleep(3)  # let the server finish reading the event files
            for name, fragment in PAGES.items():
                screenshot(chromium, f"{url}/{fragment}", args.out / f"tensorboard-{name}.png", "1400,1000")
        finally:
            server.terminate()


if __name__ == "__main__":
    main()
