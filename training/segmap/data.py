"""Semantic maps in, tensors out: ADE20K's layout, diffusers' imagefolder/metadata.jsonl layout and hub
datasets, the embedded example set, painting with the ADE palette, captions and conditions.

Label maps hold raw ADE ids: 0 = "other" (ignored by the metrics, painted black), 1..150 the classes
(ground.ade20k). Images are resized bilinearly and label maps with NEAREST (so no label is ever
invented between two classes), both shorter side -> resolution then the same centre crop.

Everything a run needs is checked when the set is loaded (pairing by stem, readable files, sizes,
label values), so bad input stops the run before the model loads, with one line naming the file.

The embedded set (no data flag): five real photos that scikit-image ships (astronaut, chelsea, coffee,
rocket, camera) with label maps the project derives from them: k-means (k = number of classes the photo
shows, 10 seeded iterations) on CIELAB colour plus position, the clusters ordered by their mean row
(top to bottom) and given the photo's hand-picked ADE classes in that order (e.g. rocket: sky, tower,
tree, earth). The maps are rough but real segmentations of real photos, in ADE's id space.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from skimage import data as skimage_data
from skimage.color import rgb2lab
from tqdm.auto import tqdm

from ground import ade20k
from training.common import TrainingError, hfdata
from training.common.batches import mix_seed
from training.images.files import open_image, resize_short, to_rgb

logger = logging.getLogger("lowrank.training")

CONDITIONS = ("seg", "canny", "shuffle")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
_LUT = np.zeros((256, 3), dtype=np.uint8)
_LUT[1:ade20k.NUM_CLASSES + 1] = np.asarray(ade20k.PALETTE, dtype=np.uint8)
# colour -> raw label; for the one shared colour the lower label wins (ground.ade20k.SHARED_COLOUR)
_COLOUR_TO_LABEL = {}
for _k in range(ade20k.NUM_CLASSES, 0, -1):
    _r, _g, _b = ade20k.PALETTE[_k - 1]
    _COLOUR_TO_LABEL[(_r << 16) | (_g << 8) | _b] = _k

# (photo, ADE classes top to bottom): what each embedded photo shows
EXAMPLE_PHOTOS = (("astronaut", ("wall", "person", "flag")), ("chelsea", ("wall", "animal")),
                  ("coffee", ("table", "plate", "food")), ("rocket", ("sky", "tower", "tree", "earth")),
                  ("camera", ("sky", "building", "person", "grass")))
EXAMPLE_VALIDATION = ("rocket", "chelsea")   # their mirror images are the validation maps
EXAMPLE_NAME = "embedded example set (5 scikit-image photos, k-means label maps; 2 mirrored for validation)"


# ----- palette ----------------------------------------------------------------------------------------
def paint(label: np.ndarray) -> Image.Image:
    """Raw ADE label map (H, W) -> RGB control image in the ADE palette (0 -> black)."""
    return Image.fromarray(_LUT[np.asarray(label, dtype=np.uint8)], "RGB")


def unpaint(rgb) -> np.ndarray:
    """RGB map painted with the ADE palette -> raw labels; colours not in the palette -> 0 (ignored)."""
    arr = np.asarray(rgb, dtype=np.uint32)[..., :3]
    packed = (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]
    keys, inverse = np.unique(packed, return_inverse=True)
    values = np.array([_COLOUR_TO_LABEL.get(int(k), 0) for k in keys], dtype=np.uint8)
    return values[inverse].reshape(packed.shape)


def caption_from_map(label: np.ndarray, top: int = 3) -> str:
    """'a photo of wall, floor, bed': the map's largest classes, largest first (label 0 left out)."""
    counts = np.bincount(np.asarray(label, dtype=np.int64).ravel(), minlength=256)[1:ade20k.NUM_CLASSES + 1]
    order = [int(i) for i in np.argsort(-counts, kind="stable")[:top] if counts[i] > 0]
    return "a photo of " + ", ".join(ade20k.CLASSES[i] for i in order) if order else "a photo"


# ----- reading files ------------------------------------------------------------------------------------
def read_label(path: Path) -> np.ndarray:
    """A label map file: single-channel ids (ADE's annotations) or an RGB map in the ADE palette."""
    try:
        with Image.open(path) as img:
            img.load()
            return label_from_image(img, str(path))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise TrainingError(f"{path} is not a readable label map ({type(e).__name__}); replace or remove it") from None


def label_from_image(img: Image.Image, where: str) -> np.ndarray:
    """Raw ADE ids of a label map image: single-channel ids as they are, RGB colours through the palette."""
    if img.mode in ("RGB", "RGBA"):
        return unpaint(img.convert("RGB"))
    label = np.asarray(img if img.mode != "P" else img.convert("L"), dtype=np.int64)
    if label.ndim != 2:
        raise TrainingError(f"{where}: a label map must have one channel (ids) or RGB palette colours")
    if label.size and label.max() > ade20k.NUM_CLASSES:
        raise TrainingError(f"{where} holds label {int(label.max())}, above ADE20K's {ade20k.NUM_CLASSES} classes "
                            f"(0 = other, 1..150); convert it to ADE ids or remove it")
    return label.astype(np.uint8)


def read_image(path: Path) -> Image.Image:
    try:
        return open_image(path)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise TrainingError(f"{path} is not a readable image; replace or remove it") from None


def image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise TrainingError(f"{path} is not a readable image; replace or remove it") from None


@dataclass
class Example:
    """One (image, map) pair. Sources are paths or in-memory PIL images / label arrays; caption None =
    made from the map. `label` False: the conditioning image is not a label map (data-made canny etc.)."""
    stem: str
    image: object
    condition: object
    caption: str | None = None
    is_label: bool = True

    def load(self) -> tuple[Image.Image, np.ndarray | Image.Image]:
        img = read_image(self.image) if isinstance(self.image, Path) else self.image
        if not self.is_label:
            return img, read_image(self.condition) if isinstance(self.condition, Path) else self.condition
        return img, read_label(self.condition) if isinstance(self.condition, Path) else self.condition


def check_pairs(examples: list[Example], what: str) -> list[Example]:
    """Sizes and label values of every pair, before any model is loaded."""
    if not examples:
        raise TrainingError(f"{what} holds no image/map pairs; see --train_data_dir's help for the layouts")
    for ex in tqdm(examples, desc=f"Checking {len(examples)} pairs", disable=len(examples) < 200):
        if not isinstance(ex.image, Path):
            continue
        size = image_size(ex.image)
        if ex.is_label:
            label = read_label(ex.condition)
            if label.shape[::-1] != size:
                raise TrainingError(f"{ex.condition} is {label.shape[1]}x{label.shape[0]} but its image {ex.image} "
                                    f"is {size[0]}x{size[1]}; a map must have its image's size")
        elif image_size(ex.condition) != size:
            raise TrainingError(f"{ex.condition} and its image {ex.image} differ in size")
    return examples


def ade_split(root: Path, split: str, required: bool = True) -> list[Example]:
    """ADEChallengeData2016: images/<split>/*.jpg with annotations/<split>/*.png, paired by stem."""
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    if not img_dir.is_dir() or not ann_dir.is_dir():
        if required:
            raise TrainingError(f"{root} has no images/{split} and annotations/{split} folders (ADE20K layout)")
        return []
    files = {d: sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
             for d in (img_dir, ann_dir)}
    for d, paths in files.items():
        for p in paths:
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise TrainingError(f"{p} is not an image file; remove it from {d}")
    images = {p.stem: p for p in files[img_dir]}
    maps = {p.stem: p for p in files[ann_dir]}
    for stem in sorted(images.keys() - maps.keys()):
        raise TrainingError(f"{images[stem]} has no label map {ann_dir / (stem + '.png')}; add it or remove the image")
    for stem in sorted(maps.keys() - images.keys()):
        raise TrainingError(f"{maps[stem]} has no image of the same name in {img_dir}; add it or remove the map")
    return [Example(s, images[s], maps[s]) for s in sorted(images)]


def metadata_rows(root: Path, image_col: str | None, cond_col: str | None, caption_col: str | None,
                  condition: str) -> list[Example]:
    """diffusers' imagefolder: root/metadata.jsonl, one {"file_name", "conditioning_image", "text"} per line
    (column names from the flags; paths relative to root)."""
    path = root / "metadata.jsonl"
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise TrainingError(f"{path} line {n} is not JSON; fix or remove it") from None
    if not rows:
        raise TrainingError(f"{path} is empty; add one JSON line per image/map pair")
    keys = list(rows[0])
    image_col = image_col or ("file_name" if "file_name" in keys else "image")
    cond_col = cond_col or "conditioning_image"
    out = []
    for n, row in enumerate(rows, 1):
        for col in (image_col, cond_col):
            if not isinstance(row.get(col), str):
                raise TrainingError(f"{path} line {n} has no {col!r} path (set --image_column / "
                                    f"--conditioning_image_column to the column names)")
        img, cond = root / row[image_col], root / row[cond_col]
        for p, other in ((img, "image"), (cond, "map")):
            if not p.is_file():
                raise TrainingError(f"{path} line {n}: {p} does not exist; add the {other} or remove the line")
        caption = row.get(caption_col or "text")
        out.append(Example(Path(row[image_col]).stem, img, cond, caption if isinstance(caption, str) else None,
                           is_label=condition == "seg"))
    return out


def hub_dataset(name: str, image_col, cond_col, caption_col, condition: str, cache_dir=None) -> list[Example]:
    """--dataset_name: a hub dataset or a local `datasets` source (a save_to_disk folder, parquet files, an
    imagefolder with metadata.jsonl; training/common/hfdata.py) with image / conditioning image / caption
    columns (diffusers' train_controlnet.py defaults: the first three columns). Image cells may be Image
    features or paths relative to the dataset's folder."""
    what = f"--dataset_name {name}"
    table = hfdata.pick_split(hfdata.load_splits(name, "--dataset_name", cache_dir=cache_dir), "train", what)
    cols = table.column_names
    if len(cols) < 2 and not (image_col and cond_col):
        raise TrainingError(f"{what} has one column ({cols[0]}); it needs an image and a conditioning image column")
    image_col, cond_col = image_col or cols[0], cond_col or cols[1]
    caption_col = caption_col or (cols[2] if len(cols) > 2 else None)
    hfdata.require_columns(table, {image_col: "--image_column", cond_col: "--conditioning_image_column",
                                   **({caption_col: "--caption_column"} if caption_col else {})}, what)
    local = Path(name).expanduser()
    base = local if local.is_dir() else local.parent if local.is_file() else None
    out = []
    for i, row in enumerate(table):
        where = f"{what} row {i}"
        img = to_rgb(hfdata.open_cell(row[image_col], base, where))
        cond = hfdata.open_cell(row[cond_col], base, where)
        if condition == "seg":
            cond = label_from_image(cond, f"{where} column {cond_col!r}")
            if cond.shape[::-1] != img.size:
                raise TrainingError(f"{where}: the map is {cond.shape[1]}x{cond.shape[0]} but the image is "
                                    f"{img.size[0]}x{img.size[1]}; a map must have its image's size")
        else:
            cond = to_rgb(cond)
        caption = row.get(caption_col) if caption_col else None
        out.append(Example(f"{i:06d}", img, cond, caption if isinstance(caption, str) else None,
                           is_label=condition == "seg"))
    return out


# ----- the embedded set ---------------------------------------------------------------------------------
def kmeans_labels(photo: np.ndarray, k: int, seed: int = 0, iters: int = 10) -> np.ndarray:
    """(H, W) cluster ids 0..k-1 ordered top to bottom: k-means on CIELAB colour + position."""
    h, w = photo.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    feats = np.concatenate([rgb2lab(photo).reshape(-1, 3), 60 * np.stack([yy / h, xx / w], -1).reshape(-1, 2)], 1)
    rng = np.random.default_rng(seed)
    centres = feats[rng.choice(len(feats), k, replace=False)]
    for _ in range(iters):
        assign = ((feats[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([feats[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
    order = np.argsort(centres[:, 3])    # mean row: top first
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return rank[assign].reshape(h, w)


def example_set(size: int = 128) -> tuple[list[Example], list[Example]]:
    """(training, validation) of the embedded set; photos centre-cropped to squares of `size` px."""
    train, val = [], []
    for name, classes in EXAMPLE_PHOTOS:
        photo = getattr(skimage_data, name)()
        img = centre_square(Image.fromarray(photo).convert("RGB"), size, Image.BILINEAR)
        clusters = kmeans_labels(np.asarray(img), len(classes))
        ids = np.array([ade20k.CLASSES.index(c) + 1 for c in classes], dtype=np.uint8)
        label = ids[clusters]
        train.append(Example(name, img, label))
        if name in EXAMPLE_VALIDATION:
            val.append(Example(f"{name}-mirror", img.transpose(Image.FLIP_LEFT_RIGHT), label[:, ::-1].copy()))
    return train, val


# ----- tensors ------------------------------------------------------------------------------------------
def centre_square(img: Image.Image, size: int, resample) -> Image.Image:
    img = resize_short(img, size, resample)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def condition_image(condition: str, image: Image.Image, label, resolution: int, seed: int) -> Image.Image:
    """The control image: the painted map (seg) or a weight-free controlnet-aux detector on the image."""
    if condition == "seg":
        return paint(label)
    if condition == "canny":
        from controlnet_aux import CannyDetector
        detector = CannyDetector()
    else:
        from controlnet_aux import ContentShuffleDetector
        detector = ContentShuffleDetector()
    # controlnet-aux rounds its working size to multiples of 64: run at >= 64 px, resize back afterwards
    work = max(64, -(-resolution // 64) * 64)
    state = np.random.get_state()   # the shuffle draws from numpy's global RNG: seed it per example
    np.random.seed(seed % 2**32)
    try:
        out = detector(np.asarray(image), detect_resolution=work, image_resolution=work, output_type="pil")
    finally:
        np.random.set_state(state)
    return out.convert("RGB").resize((resolution, resolution), Image.BILINEAR)


def prepare(example: Example, resolution: int, condition: str, seed: int) -> dict:
    """Image, control image and label map at resolution x resolution, and the caption (None: from the map)."""
    img, cond = example.load()
    img = centre_square(img, resolution, Image.BILINEAR)
    if example.is_label:
        label = np.asarray(centre_square(Image.fromarray(cond), resolution, Image.NEAREST))
        control = condition_image(condition, img, label, resolution, seed)
    else:
        label, control = None, centre_square(cond, resolution, Image.BILINEAR)
    caption = example.caption if example.caption is not None else (caption_from_map(label) if label is not None
                                                                   else "")
    return {"image": img, "control": control, "label": label, "caption": caption}


class SemanticMapDataset(torch.utils.data.Dataset):
    """Index k = a position in the whole run (batches.epoch_batches): example k % n, its empty-prompt draw
    (--proportion_empty_prompts) and its shuffle seeded from (seed, k), so resume sees the same batches."""

    def __init__(self, examples: list[Example], resolution: int, condition: str, seed: int,
                 proportion_empty_prompts: float = 0.0):
        self.examples, self.resolution, self.condition, self.seed = examples, resolution, condition, seed
        self.empty = proportion_empty_prompts

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, k: int) -> dict:
        s = mix_seed(self.seed, k)
        item = prepare(self.examples[k % len(self.examples)], self.resolution, self.condition, s)
        if self.empty and torch.rand((), generator=torch.Generator().manual_seed(s)).item() < self.empty:
            item["caption"] = ""
        return {"pixel_values": to_tensor(item["image"]) * 2 - 1,
                "conditioning_pixel_values": to_tensor(item["control"]), "caption": item["caption"]}


def to_tensor(img: Image.Image) -> torch.Tensor:
    """[0, 1] CHW (diffusers' ControlNet feeds control images in [0, 1]; images are mapped to [-1, 1])."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def collate(items: list[dict]) -> dict:
    return {"pixel_values": torch.stack([i["pixel_values"] for i in items]),
            "conditioning_pixel_values": torch.stack([i["conditioning_pixel_values"] for i in items]),
            "captions": [i["caption"] for i in items]}
