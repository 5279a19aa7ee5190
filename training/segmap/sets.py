"""The semantic-map task's training and validation sets, from its data settings.

Shared by the trainer (training/semantic_map.py, from its flags) and eval.semantic_run (from a run's
run.json), so a run is scored on exactly the maps it was validated on, prepared the same way.
data.py reads and prepares the pairs; this module chooses which.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from training.common import TrainingError
from training.common.batches import mix_seed

from . import data as sd


@dataclass(frozen=True)
class MapData:
    """The semantic-map trainer's data flags (same names, same defaults as its --help)."""

    train_data_dir: str | None = None
    dataset_name: str | None = None
    cache_dir: str | None = None
    image_column: str | None = None
    conditioning_image_column: str | None = None
    caption_column: str | None = None
    condition: str = "seg"
    resolution: int = 512
    max_train_samples: int | None = None
    num_validation_maps: int = 4
    validation_image: list[str] | None = None
    validation_prompt: list[str] | None = None

    @classmethod
    def from_args(cls, args) -> MapData:
        """From the trainer's parsed flags (every field is one of its flags)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def load_data(data: MapData) -> tuple[list, list, str]:
    """(training examples, validation examples, source description); everything checked."""
    if data.dataset_name:
        train = sd.hub_dataset(data.dataset_name, data.image_column, data.conditioning_image_column,
                               data.caption_column, data.condition, data.cache_dir)
        val, source = train[:data.num_validation_maps], f"--dataset_name {data.dataset_name}"
    elif data.train_data_dir:
        root = Path(data.train_data_dir).expanduser()
        if not root.is_dir():
            raise TrainingError(f"--train_data_dir {root} is not a folder")
        if (root / "metadata.jsonl").is_file():
            train = sd.metadata_rows(root, data.image_column, data.conditioning_image_column, data.caption_column,
                                     data.condition)
            val, source = [], f"imagefolder {root}"
        elif (root / "images").is_dir() or (root / "annotations").is_dir():
            train, val = sd.ade_split(root, "training"), sd.ade_split(root, "validation", required=False)
            source = f"ADE20K layout {root}"
        else:
            if not any(root.iterdir()):
                raise TrainingError(f"--train_data_dir {root} is empty; see --help for the two layouts")
            raise TrainingError(f"--train_data_dir {root} has neither metadata.jsonl nor images/ + annotations/ "
                                f"(ADE20K layout); see --help")
        if data.max_train_samples:
            train = train[:data.max_train_samples]
        sd.check_pairs(train, f"--train_data_dir {root}")
        val = sd.check_pairs(val[:data.num_validation_maps], f"{root} (validation)") if val else []
    else:
        train, val = sd.example_set()
        source = sd.EXAMPLE_NAME
    if data.max_train_samples:
        train = train[:data.max_train_samples]
    val = (val or train)[:data.num_validation_maps]
    return train, val, source


def validation_items(data: MapData, val: list) -> list[dict]:
    """[{control, label, prompt}] sampled at every checkpoint, at the training resolution."""
    if data.validation_image:
        items = []
        for path in map(Path, data.validation_image):
            if data.condition == "seg":
                label = sd.read_label(path)
                ex = sd.Example(path.stem, sd.paint(label), label)
            else:
                ex = sd.Example(path.stem, sd.read_image(path), sd.read_image(path), caption="", is_label=False)
            items.append(sd.prepare(ex, data.resolution, data.condition, 0))
    else:
        items = [sd.prepare(ex, data.resolution, data.condition, mix_seed(0, i)) for i, ex in enumerate(val)]
    prompts = data.validation_prompt or [it["caption"] for it in items]
    if len(items) == 1 and len(prompts) > 1:
        items = items * len(prompts)
    if len(prompts) == 1:
        prompts = prompts * len(items)
    return [{**it, "prompt": p} for it, p in zip(items, prompts)]
