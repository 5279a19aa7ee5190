"""Tables through the `datasets` library: what `--dataset_name` (and a --train_file that is a parquet file)
names, read by the loaders datasets users already write for.

    load_splits("data/cats", "--dataset_name")        # {"train": Dataset, ...}
    table = pick_split(splits, "train", "--dataset_name data/cats")
    require_columns(table, ["image"], "--dataset_name data/cats", "--image_column")

What a source can be, tried in this order:
- a folder written by Dataset.save_to_disk / DatasetDict.save_to_disk (it holds state.json or
  dataset_dict.json): datasets.load_from_disk;
- a data file (.parquet, .json / .jsonl, .csv, .tsv): datasets.load_dataset("parquet" | "json" | "csv", ...);
- any other local folder: datasets.load_dataset(folder), which picks the builder from the files in it
  (parquet/JSON/CSV files; images with a metadata.jsonl: the imagefolder builder, whose `file_name` column
  becomes the `image` column and `<name>_file_name` columns become `<name>` image columns; every file its
  metadata names is checked first: there, and an image);
- anything else: a hub dataset name (needs the hub, or its copy in the datasets cache when offline).
Every failure is one TrainingError naming the flag, never a datasets traceback.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from . import TrainingError

SAVED_MARKERS = ("state.json", "dataset_dict.json")   # what save_to_disk writes beside the arrow files
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv"}


def _datasets(flag: str):
    try:
        import datasets
    except ImportError:   # a declared dependency; a broken environment still gets one line
        raise TrainingError(f"{flag} needs the 'datasets' package: pip install datasets") from None
    datasets.disable_progress_bars()   # a trainer prints one line per event, not a bar per split
    return datasets


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def is_local(source: str) -> bool:
    """A path on this machine (existing, or written like a path) rather than a hub name like 'user/set'."""
    path = Path(source).expanduser()
    return path.exists() or source.startswith((".", "/", "~")) or path.suffix.lower() in FILE_BUILDERS


def load_splits(source: str, flag: str, config: str | None = None, cache_dir: str | None = None) -> dict:
    """{split name: datasets.Dataset} of a saved folder, data file, data folder or hub name (module doc)."""
    datasets = _datasets(flag)
    path = Path(source).expanduser()
    empty = f"{flag} {source} is empty; it needs at least one example"
    try:
        if (path / "state.json").is_file() and not json.loads((path / "state.json").read_text()).get("_data_files"):
            raise TrainingError(empty)   # an empty Dataset saved by save_to_disk: no arrow file to load
        if path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise TrainingError(f"{flag} {path}: unknown data file type {path.suffix!r}; use a folder or a "
                                    f"{', '.join(FILE_BUILDERS)} file")
            extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            loaded = datasets.load_dataset(builder, data_files={"train": str(path)}, cache_dir=cache_dir, **extra)
        elif path.is_dir():
            if not any(p for p in path.iterdir() if not p.name.startswith(".")):
                raise TrainingError(f"{flag} {path} is an empty folder; put the data files in it")
            check_listed_files(path, f"{flag} {source}")
            loaded = datasets.load_dataset(str(path), config, cache_dir=cache_dir)
        elif is_local(source):
            raise TrainingError(f"{flag} {path} does not exist")
        else:
            loaded = datasets.load_dataset(source, config, cache_dir=cache_dir)
    except TrainingError:
        raise
    except Exception as e:   # hub/offline/unreadable files: all one line
        if "corresponds to no data" in str(e):   # datasets' word for files without a row
            raise TrainingError(empty) from None
        raise TrainingError(f"cannot load {flag} {source}: {_first_line(e)}") from None
    splits = {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    if not splits:
        raise TrainingError(f"{flag} {source} holds no data")
    return splits


METADATA_FILES = ("metadata.jsonl", "metadata.csv")   # the imagefolder builder's, in the folder or a split's


def metadata_rows(meta: Path) -> list[tuple[int, dict]]:
    """(line number, row) of an imagefolder's metadata.jsonl / metadata.csv."""
    text = meta.read_text(encoding="utf-8")
    if meta.suffix == ".csv":
        return [(n, row) for n, row in enumerate(csv.DictReader(io.StringIO(text)), 2)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError:
                raise TrainingError(f"{meta} line {n} is not JSON; fix or remove it") from None
    return rows


def check_listed_files(folder: Path, what: str) -> None:
    """Every file an imagefolder's metadata names (`file_name`, `<name>_file_name`, relative to the metadata's
    folder) exists and opens as an image, checked before anything is loaded or written: the `datasets` library
    finds a missing one only when it decodes that row, with a long FileNotFoundError traceback."""
    for meta in sorted(m for name in METADATA_FILES for m in folder.rglob(name)):
        for n, row in metadata_rows(meta):
            for key, value in (row.items() if isinstance(row, dict) else ()):
                if not (key == "file_name" or str(key).endswith("_file_name")) or not isinstance(value, str):
                    continue
                file = meta.parent / value
                where = f"{what}: {meta.name} line {n} names {value!r}"
                if not file.is_file():
                    raise TrainingError(f"{where}, which is not there ({file}); add the file or remove the line")
                try:
                    with Image.open(file) as img:
                        img.load()
                except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                    raise TrainingError(f"{where}, which does not open as an image ({file}); replace it or remove "
                                        f"the line") from None


def pick_split(splits: dict, name: str, what: str, required: bool = True):
    """splits[name]; a source with one split gives that one for 'train'. Empty tables are an error."""
    if name in splits:
        table = splits[name]
    elif name == "train" and len(splits) == 1:
        table = next(iter(splits.values()))
    elif required:
        raise TrainingError(f"{what} has no {name!r} split (it has {', '.join(splits)})")
    else:
        return None
    if len(table) == 0:
        raise TrainingError(f"{what} ({name} split) is empty; it needs at least one example")
    return table


def require_columns(table, columns: dict[str, str], what: str) -> None:
    """Every column in {column: flag that names it} exists in `table`; else one line naming the flag."""
    for column, flag in columns.items():
        if column not in table.column_names:
            raise TrainingError(f"{what} has no column {column!r} (it has {', '.join(table.column_names)}); "
                                f"name the right one with {flag}")


def open_cell(value, base: Path | None, where: str):
    """An image cell as the PIL image it stores (mode unchanged: a label map keeps its ids): an Image
    feature (decoded by datasets) or a path relative to the dataset's folder (diffusers' fill50k layout
    keeps conditioning images as path strings)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() or base is None else base / value
        if not path.is_file():
            raise TrainingError(f"{where}: {path} does not exist")
        try:
            with Image.open(path) as img:
                img.load()
                return img.copy()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise TrainingError(f"{where}: {path} is not a readable image") from None
    raise TrainingError(f"{where} holds a {type(value).__name__}, not an image or an image path")
