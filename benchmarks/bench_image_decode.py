"""What the loader pays to read a picture again instead of caching its pixels (docs/data.md).

    python benchmarks/bench_image_decode.py [--repeats 30]

For a few picture sizes and formats, times what ``TokenizedFile.read_images`` does per picture: read
the file, decode it (Pillow) and run mistral-common's image encoder (resize with OpenCV, normalise)
with the bundled ``tekken_240911.json`` image config (patch 16, max side 1024). Prints the median
milliseconds per picture, the encoded file size, and the float32 pixels a cache would have stored.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mistral_common
import numpy as np
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from finetune.data.images import decode_image, read_image_bytes

SIZES = [((256, 256), "PNG"), ((768, 1024), "JPEG"), ((1024, 1024), "PNG"), ((2048, 1536), "JPEG")]


def photo_like(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth gradients plus noise: compresses like a photograph, not like flat colour or pure noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 / w), (y * 255 / h), ((x + y) * 127 / (w + h))], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    opts = parser.parse_args()
    tokenizer = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    encoder = MistralTokenizer.from_file(str(tokenizer)).instruct_tokenizer.image_encoder
    print(f"{'picture':<18} {'file':>9} {'pixels cached':>14} {'tokens':>7} {'ms/picture':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (size, fmt) in enumerate(SIZES):
            path = Path(tmp) / f"{i}.{fmt.lower()}"
            photo_like(size, i).save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            times, encoded = [], None
            for _ in range(opts.repeats):
                t0 = time.perf_counter()
                raw, name = read_image_bytes("file://" + str(path), "bench")
                encoded = encoder(decode_image(raw, "bench", name))
                times.append(time.perf_counter() - t0)
            label = f"{size[0]}x{size[1]} {fmt}"
            print(f"{label:<18} {path.stat().st_size / 1e6:>7.2f}MB {encoded.image.nbytes / 1e6:>12.1f}MB "
                  f"{len(encoded.tokens):>7} {1e3 * statistics.median(times):>11.1f}")


if __name__ == "__main__":
    main()
