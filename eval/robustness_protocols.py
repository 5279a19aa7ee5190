"""Named settings of the robustness study (`python -m eval.robustness --protocol NAME`): a published benchmark's
setting as one command. A protocol gives the study's own flags, the base learning rates, the trainer's flags and,
where the benchmark fixes its data, how to lay that data out for the trainer. Every one of them is a default: a
flag given on the command line wins (a base rate given with --base_lrs replaces that method's rate only).

peft-image-gen  peft's image-generation benchmark (huggingface/peft, method_comparison/image-gen): FLUX.2-klein-base-4B
                fine-tuned on peft's cat set (peft-internal-testing/cat-image-dataset, 20 photos with one prompt each;
                peft's seeded split keeps 14 for training) at 512 px, batch 2, 750 steps, AdamW (weight decay 1e-4)
                at a constant rate, gradient norms clipped at 1, flow matching with uniform timesteps
                (weighting_scheme none), rank 32 with α = r on peft's target modules, gradient checkpointing, the
                text encoder off the accelerator once prompts are encoded (--offload), frozen weights in bf16 and
                adapters in fp32; lora, dora, delora and etherplus at peft's base rates times 1, 2, 4, 8 and 16,
                and one prolonged run (3000 steps) per method. The data: the cat set's train split
                written as an image folder with a `prompt` column (metadata.jsonl), which the trainer reads with
                --dataset_name and --caption_column.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.common import TrainingError, hfdata
from training.common.tasks import DREAMBOOTH

from . import EvalError
from .robustness_tasks import flag_value


@dataclass(frozen=True)
class Protocol:
    name: str
    about: str                                    # one line: --help and the study's commands
    task: str                                     # the study task it is a setting of
    study: dict = field(default_factory=dict)     # eval.robustness flags (argparse dest -> value as parsed)
    base_lrs: dict[str, float] = field(default_factory=dict)
    trainer: tuple[tuple[str, ...], ...] = ()     # trainer flags: (flag, *values); a switch has no values
    alpha_is_rank: bool = False                   # --alpha follows a --rank given on the command line
    data: Callable[[Path, str | None], list[str]] | None = None   # (study folder, --protocol_data) -> data flags
    data_flags: tuple[str, ...] = ("--dataset_name", "--instance_data_dir")   # the user's own data: no layout


# ----- peft's image-generation benchmark ------------------------------------------------------------------
PEFT_CAT_SET = "peft-internal-testing/cat-image-dataset"
# default_training_params.json's instance_prompts: row i of the cat set is photo i's prompt
PEFT_CAT_PROMPTS = (
    "sks cat sitting on a chair in front of a box of chocolates",
    "sks cat playing on the Steam Deck",
    'sks cat reading the newspaper with the title "DIE BOX"',
    "sks cat being fed sushi",
    "sks cat in front of a box of tomatoes",
    "a gingerbread house in front of sks cat",
    "sks cat is wearing a Wednesday Addams costume",
    "sks cat looks skeptical as he reads a magazine depicting a black cat",
    "sks cat wearing a striped scarf",
    "sleepy sks cat lying in bed covered by a blue blanket",
    "sks cat wearing a necklace while sitting in a box on a sofa",
    "a box with four donuts in front of sks cat",
    "sks cat wearing a pink veil with flowers on it and a dagger made out of yellow cardboard",
    "sks cat between two pillows, with one pillow showing a polar bear and the other a fox",
    "sks cat with an espresso reading the newspaper",
    "a close up of a hand petting sks cat on the head",
    "sks cat opens a white door",
    'sks cat with a VIP "all access" pass',
    'sks cat in front of a monitor showing the video game "RimWorld"',
    "sks cat reads a newspaper about cannabis",
)
PEFT_SAMPLE_PROMPTS = ("a photo of sks cat", "a color drawing of sks cat", "sks cat at the beach",
                       "a photo of sks dog", "a photo of an orange cat")
PEFT_HELD_OUT = 2 + 4   # valid_size + test_size: the last rows of the shuffled order, never trained on
# the LoRA-family targets of peft's klein experiments (lora/dora/delora adapter_config.json); suffixes, so the
# single blocks' `attn.to_out` (a Linear, not to_out.0) is left out there as here
PEFT_TARGETS = ",".join(("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                         "to_qkv_mlp_proj", "linear_in", "linear_out"))


def peft_train_split(n: int) -> list[int]:
    """The rows peft trains on (data.py: np.random.seed(0), shuffle 0..n-1, the first n - 6)."""
    order = np.arange(n)
    np.random.RandomState(0).shuffle(order)   # the generator np.random.seed(0) seeds: the same permutation
    return [int(i) for i in order[:n - PEFT_HELD_OUT]]


def peft_cat_folder(study_dir: Path, source: str | None) -> list[str]:
    """The cat set's training photos as an image folder (PNG files + metadata.jsonl with each photo's prompt) in
    STUDY/data/peft-cat-train, written once; the trainer flags that read it."""
    folder = study_dir / "data" / "peft-cat-train"
    flags = ["--dataset_name", str(folder), "--caption_column", "prompt"]
    if (folder / "metadata.jsonl").is_file():
        return flags
    source = source or PEFT_CAT_SET
    what = f"--protocol_data {source}"
    try:
        table = hfdata.pick_split(hfdata.load_splits(source, "--protocol_data"), "train", what)
        hfdata.require_columns(table, {"image": "--protocol_data (a dataset with an image column)"}, what)
    except TrainingError as e:
        raise EvalError(str(e)) from None
    if len(table) != len(PEFT_CAT_PROMPTS):
        raise EvalError(f"{what} has {len(table)} rows; peft's cat set has {len(PEFT_CAT_PROMPTS)}, one per prompt")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    local = Path(source).expanduser()   # image cells that are paths are relative to a local dataset's folder
    base = local if local.is_dir() else local.parent if local.is_file() else None
    rows = []
    for i in peft_train_split(len(table)):
        image = hfdata.open_cell(table[i]["image"], base, f"{what} row {i}")
        image.convert("RGB").save(tmp / f"cat-{i:02d}.png")
        rows.append({"file_name": f"cat-{i:02d}.png", "prompt": PEFT_CAT_PROMPTS[i]})
    (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return flags


PEFT_IMAGE_GEN = Protocol(
    name="peft-image-gen",
    about="peft's image-gen benchmark: FLUX.2-klein-base-4B, peft's cat set, 512 px, batch 2, 750 steps",
    task=DREAMBOOTH.name,
    study={"methods": ["lora", "dora", "delora", "etherplus"], "lr_factors": ["1", "2", "4", "8", "16"],
           "max_train_steps": 750, "long_steps": 3000, "checkpointing_steps": 250, "studies": ["lr", "long", "norms"],
           "seed": 0, "dino_model": "facebook/dinov2-base", "max_prompts": 25, "images_per_prompt": 4,
           "drift_prompts": 10},
    # peft's rates: lora and dora 1e-4, delora 1e-3 (its training_params.json override); ETHER+ is not on peft's
    # board: it gets DeLoRA's rate, as lowrank's own defaults give the bounded methods one rate, 10x LoRA's
    base_lrs={"lora": 1e-4, "dora": 1e-4, "delora": 1e-3, "etherplus": 1e-3},
    trainer=(("--pretrained_model_name_or_path", "black-forest-labs/FLUX.2-klein-base-4B"),
             ("--resolution", "512"), ("--center_crop",), ("--train_batch_size", "2"),
             ("--lr_scheduler", "constant"), ("--adam_weight_decay", "1e-4"), ("--max_grad_norm", "1.0"),
             ("--weighting_scheme", "none"), ("--rank", "32"), ("--alpha", "32"), ("--target_modules", PEFT_TARGETS),
             ("--gradient_checkpointing",), ("--offload",), ("--mixed_precision", "bf16"),
             ("--instance_prompt", "a photo of sks cat"),
             ("--validation_prompt", *PEFT_SAMPLE_PROMPTS), ("--num_validation_images", "2"),
             ("--num_inference_steps", "20"), ("--guidance_scale", "3.5")),
    alpha_is_rank=True,   # peft's LoRA-family configs keep lora_alpha = r
    data=peft_cat_folder,
)

PROTOCOLS = {p.name: p for p in (PEFT_IMAGE_GEN,)}


def given_flags(passthrough: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in passthrough if a.startswith("--")}


def trainer_flags(protocol: Protocol, passthrough: list[str]) -> list[str]:
    """The protocol's trainer flags the command line does not give (a given flag wins with all its values)."""
    given, out = given_flags(passthrough), []
    for flag, *values in protocol.trainer:
        if flag not in given:
            out += [flag, *values]
    rank = flag_value(passthrough, "--rank")
    if protocol.alpha_is_rank and rank is not None and "--alpha" not in given:
        out[out.index("--alpha") + 1] = rank
    return out


def data_flags(protocol: Protocol, study_dir: Path, source: str | None, passthrough: list[str]) -> list[str]:
    """The trainer flags naming the protocol's data, laid out under the study folder; none when the command line
    names data of its own."""
    if protocol.data is None or given_flags(passthrough) & set(protocol.data_flags):
        return []
    return protocol.data(study_dir, source)
