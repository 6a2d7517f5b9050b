"""A detection run's split (RUN/splits.json): the images of each split by
their path relative to the data root, so `evaluate` and `--resume` find the
same images, and the run id shared with config.json and model.pt."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from imgclf.errors import RunError
from imgclf.io import read_json, write_json
from imgclf.runs import RunDir
from imgclf.tasks.detect.data import SPLITS, DetDataset


@dataclass
class DetSplits:
    data: str  # what `imgclf train` was given
    format: str
    classes: list[str]
    run_id: str
    files: dict[str, list[str]] = field(default_factory=dict)  # split -> paths relative to the data root
    task: str = "detect"

    @classmethod
    def of(cls, ds: DetDataset, split: dict[str, list[int]], data: str, run_id: str) -> DetSplits:
        return cls(str(data), ds.format, list(ds.classes), run_id,
                   {s: [rel(ds, ds.images[i].path) for i in split.get(s, [])] for s in SPLITS})

    @classmethod
    def read(cls, run: RunDir) -> DetSplits:
        try:
            d = read_json(run.splits_file)
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise RunError(f"{run.splits_file}: unreadable ({e})", "train the run again") from None

    def write(self, run: RunDir) -> None:
        write_json(run.splits_file, asdict(self))

    def indices(self, ds: DetDataset) -> dict[str, list[int]]:
        """This split's images in `ds` (the same data, read again); files gone
        since are left out with a warning-free count the caller can report."""
        where = {rel(ds, im.path): i for i, im in enumerate(ds.images)}
        return {s: [where[f] for f in self.files.get(s, []) if f in where] for s in SPLITS}


def rel(ds: DetDataset, path: str | Path) -> str:
    p = Path(path)
    try:
        return p.resolve().relative_to(Path(ds.root).resolve()).as_posix()
    except ValueError:
        return p.as_posix()
