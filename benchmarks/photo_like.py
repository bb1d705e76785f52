"""How well `fashion-cnn predict`'s photo preprocessing brings photos back to the training format.

There are no real product photos with labels at hand, so this makes photo-like images from
validation images (the last 20 % of the training files, which the run never fit; the test set
stays untouched, since what this measures shapes the preprocessing), as a camera or a shop's
picture would show the garment: blown up 10x (bicubic), as a colored garment on a light
background (or a light one on a dark background), off-centre on a larger canvas of another
shape, saved as JPEG. Each goes through `predict.to_fashion_mnist` (trim, background to black,
longer side to 28, brightest pixel to 255, centred), and the run's model predicts it; the
table compares its accuracy with the same model on the original 28x28 images, and how often
the two predictions agree.

    python benchmarks/photo_like.py RUN_DIR                # 2,000 validation images
    python benchmarks/photo_like.py RUN_DIR --images 10000
    python benchmarks/photo_like.py --smoke                # seconds: trains a tiny run first
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np
from PIL import Image

from common import machine_info, note, parse_run_args, smoke_run, table, write_result
import fashion_cnn as run
from fashion_cnn.data.fashion_mnist import load_data, validation_split
from fashion_cnn.apps.predict import predict_arrays, to_fashion_mnist

# (name, garment RGB, background RGB, canvas (width, height), top-left of the 280x280 garment)
VARIANTS = [
    ("navy on light grey", (40, 60, 120), (240, 240, 240), (400, 500), (40, 150)),
    ("red on white, wide", (190, 30, 40), (255, 255, 255), (900, 400), (500, 60)),
    ("white on dark grey", (235, 235, 235), (35, 35, 35), (500, 500), (110, 110)),
]
SCALE = 10  # 28 px -> 280 px


def photo(image: np.ndarray, garment, background, canvas, corner, jpeg_quality: int) -> Image.Image:
    """An image (28, 28) uint8 as a JPEG-compressed RGB photo of the garment."""
    big = Image.fromarray(image).resize((28 * SCALE, 28 * SCALE), Image.Resampling.BICUBIC)
    weight = np.asarray(big, dtype=np.float32)[..., None] / 255.0  # (280, 280, 1) garment share
    background, garment = np.array(background, np.float32), np.array(garment, np.float32)
    pixels = np.empty((canvas[1], canvas[0], 3), np.float32)
    pixels[:] = background
    x, y = corner
    pixels[y:y + 28 * SCALE, x:x + 28 * SCALE] = background + weight * (garment - background)
    buffer = io.BytesIO()
    Image.fromarray(pixels.round().astype(np.uint8)).save(buffer, format="JPEG",
                                                         quality=jpeg_quality)
    buffer.seek(0)
    return Image.open(buffer)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", help="a trained run (fashion-cnn train ...)")
    p.add_argument("--images", type=int, default=2000,
                   help="first N validation images (default 2,000)")
    p.add_argument("--jpeg-quality", type=int, default=85)
    return parse_run_args(p, argv, "photo_like.json", "train a tiny run and use 50 images")


def main(argv=None) -> int:
    args = parse_args(argv)
    data = load_data()
    run_dir = args.run_dir
    if args.smoke:
        run_dir = smoke_run("photo-like-", data, 2000)
        args.images = 50
    config, model = run.load_model(run_dir)
    if not config.data.validation_split:
        raise SystemExit(f"photo_like: {run_dir} was trained without a validation split; "
                         f"every training image was fit")
    _, val = validation_split(len(data.train_images), config.data.validation_split)
    images = data.train_images[val][:args.images]
    labels = data.train_labels[val][:args.images]
    original = predict_arrays(model, config, images).argmax(1)
    rows, results = [["original 28x28", f"{np.mean(original == labels):.4f}", "-", "-"]], []
    for name, garment, background, canvas, corner in VARIANTS:
        note(f"photo_like: {name} ...")
        converted, inverted = [], 0
        for image in images:
            array, was_inverted = to_fashion_mnist(
                photo(image, garment, background, canvas, corner, args.jpeg_quality))
            converted.append(array)
            inverted += was_inverted
        predicted = predict_arrays(model, config, np.stack(converted)).argmax(1)
        accuracy = float(np.mean(predicted == labels))
        agreement = float(np.mean(predicted == original))
        results.append({"variant": name, "accuracy": accuracy, "agreement": agreement,
                        "inverted_fraction": inverted / len(images)})
        rows.append([name, f"{accuracy:.4f}", f"{agreement:.4f}", f"{inverted / len(images):.2f}"])
    print(f"\n{run_dir}: first {len(images)} validation images, as photos through `predict`'s "
          f"preprocessing (JPEG quality {args.jpeg_quality})")
    print(table(["images", "accuracy", "agrees with original", "inverted"], rows))
    write_result(args.out, {
        "benchmark": "photo_like", "machine": machine_info(), "run_dir": str(run_dir),
        "images": len(images), "jpeg_quality": args.jpeg_quality,
        "original_accuracy": float(np.mean(original == labels)), "variants": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
