"""A multi-label dataset made of real photos, for the tests, the benchmark and the README.

Each image is a grey 448x224 canvas holding a cat or dog photo (or nothing)
on the left and an ant or bee photo (or nothing) on the right, each 224x224;
its labels are the photos' classes, from none to two of {cat, dog, ant, bee}.
Train with `--resize squash` so neither photo is cropped away. Every source
photo is used once, so no photo is in two splits. Written as
OUT/images/*.jpg and OUT/labels.csv (path,labels).
"""

from __future__ import annotations

import random
from pathlib import Path

SLOTS = {"left": {"cat": "{pets}/*/cats", "dog": "{pets}/*/dogs"},
         "right": {"ant": "hymenoptera/*/ants", "bee": "hymenoptera/*/bees"}}


def compose(datasets: Path, out: Path, n: int = 240, seed: int = 0, empty: float = 0.2,
            pets: str = "cats_dogs_tiny") -> Path:
    """Write n composite images and OUT/labels.csv; returns the CSV's path.
    pets: the cats-and-dogs dataset for the left slot (cats_and_dogs_filtered for more)."""
    from PIL import Image

    rng = random.Random(seed)
    pools = {lab: sorted(p for d in datasets.glob(pattern.format(pets=pets)) for p in sorted(d.iterdir())
                         if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
             for slot in SLOTS.values() for lab, pattern in slot.items()}
    for pool in pools.values():
        rng.shuffle(pool)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    for i in range(n):
        canvas, labels = Image.new("RGB", (448, 224), (128, 128, 128)), []
        for x, slot in ((0, "left"), (224, "right")):
            choices = [lab for lab in SLOTS[slot] if pools[lab]]
            if not choices or rng.random() < empty:
                continue
            lab = rng.choice(choices)
            with Image.open(pools[lab].pop()) as im:
                canvas.paste(im.convert("RGB").resize((224, 224), Image.BILINEAR), (x, 0))
            labels.append(lab)
        name = f"images/{i:04d}.jpg"
        canvas.save(out / name, quality=90)
        rows.append(f"{name},{';'.join(labels)}")
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    return out / "labels.csv"


if __name__ == "__main__":
    import sys

    print(compose(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 240))
