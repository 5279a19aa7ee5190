"""Instruction tuning data (Alpaca format, prompt masked out of the loss) and zero-shot multiple choice by
log-likelihood.

Alpaca format: a JSON list or JSON-lines file (or a parquet file, or any `datasets` source via --dataset_name) of
{"instruction": ..., "input": ... (may be empty), "output": ...},
rendered with Alpaca's own prompt template; the model learns the response only (prompt labels are -100).

Multiple-choice files (JSON lines, one item per line), the field names of the hub versions of each benchmark:
    arc             {"question": str, "choices": {"text": [str, ...], "label": ["A", ...]}, "answerKey": "A"}
                    (allenai/ai2_arc)
    mmlu            {"question": str, "choices": [str, ...], "answer": int}                     (cais/mmlu)
    truthfulqa_mc1  {"question": str, "mc1_targets": {"choices": [str, ...], "labels": [1, 0, ...]}}
    truthfulqa_mc2  {"question": str, "mc2_targets": {"choices": [str, ...], "labels": [1, 1, 0, ...]}}
                    (truthful_qa, multiple_choice config)
Each choice is scored by the summed log-probability of " <choice>" after "Question: <question>\\nAnswer:" (the
lm-evaluation-harness prompt of ARC and TruthfulQA). arc, mmlu, truthfulqa_mc1: accuracy of the argmax;
truthfulqa_mc2: the normalised probability mass of the true answers, Σ_true p / Σ_all p (TruthfulQA's MC2).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ground import runfolder
from training.common import TrainingError, hfdata

PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
IGNORE = -100   # the label cross_entropy skips
MC_FORMATS = ("arc", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2")
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EXAMPLE_INSTRUCTIONS = DATA_DIR / "alpaca_example.jsonl"
EXAMPLE_MC = DATA_DIR / "mc_example.jsonl"


def read_json_records(path: Path) -> list[dict]:
    """A JSON list of objects or JSON lines; TrainingError naming the line for anything else."""
    if not path.is_file():
        raise TrainingError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TrainingError(f"cannot read {path}: {e}") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise TrainingError(f"{path} is not valid JSON: {e}") from None
        bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
        if bad:
            raise TrainingError(f"{path} item {bad} is not a JSON object")
    else:
        rows, bad = runfolder.parse_jsonl(text)
        if bad:
            raise TrainingError(f"{path} line {bad[0][0]} is not a JSON object")
    if not rows:
        raise TrainingError(f"{path} has no examples")
    return rows


def alpaca_prompt(row: dict) -> str:
    template = PROMPT_WITH_INPUT if str(row.get("input") or "").strip() else PROMPT_NO_INPUT
    return template.format(instruction=row["instruction"], input=row.get("input") or "")


def encode_instruction(tokenizer, row: dict, max_length: int) -> dict:
    """input_ids of prompt + response + EOS, labels with the prompt positions set to IGNORE."""
    prompt = tokenizer(alpaca_prompt(row), add_special_tokens=False)["input_ids"]
    response = tokenizer(str(row["output"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    add_bos = getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None
    bos = [tokenizer.bos_token_id] if add_bos else []
    ids = (bos + prompt + response)[:max_length]
    labels = ([IGNORE] * (len(bos) + len(prompt)) + response)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def instruction_rows(source: str, flag: str = "--train_file", cache_dir: str | None = None) -> list[dict]:
    """Alpaca rows, checked: a JSON list / JSON-lines file, or, through `datasets`, a .parquet file or (flag
    --dataset_name) any `datasets` source: a save_to_disk folder, a folder of data files, a hub name."""
    path = Path(source).expanduser()
    if flag == "--train_file" and path.suffix.lower() != ".parquet":
        rows = read_json_records(path)
    else:
        what = f"{flag} {source}"
        rows = hfdata.pick_split(hfdata.load_splits(source, flag, cache_dir=cache_dir), "train", what).to_list()
    for i, row in enumerate(rows, 1):
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing:
            raise TrainingError(f"{flag} {source} example {i} has no {' or '.join(missing)} text (Alpaca format: "
                                f"instruction, input, output; columns found: {', '.join(row) or 'none'})")
    return rows


def load_instructions(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Encoded examples and how many were dropped because the prompt alone fills max_length."""
    encoded = [encode_instruction(tokenizer, row, max_length) for row in rows]
    kept = [e for e in encoded if any(y != IGNORE for y in e["labels"])]
    if not kept:
        raise TrainingError(f"every prompt is longer than --max_seq_length {max_length}; raise it")
    return kept, len(encoded) - len(kept)


def pad_batch(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding: input_ids with pad_id, attention_mask 0, labels IGNORE."""
    n = max(len(f["input_ids"]) for f in features)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        pad = n - len(f["input_ids"])
        out["input_ids"].append(f["input_ids"] + [pad_id] * pad)
        out["attention_mask"].append(f["attention_mask"] + [0] * pad)
        out["labels"].append(f["labels"] + [IGNORE] * pad)
    return {k: torch.tensor(v) for k, v in out.items()}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens (labels != IGNORE), logits predicting token t+1."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


# ----- multiple choice ------------------------------------------------------------------------------------------
def mc_item(row: dict, fmt: str, where: str) -> tuple[str, list[str], list[int]]:
    """(question, choices, true choice indices) of one item in `fmt`."""
    try:
        q = str(row["question"])
        if fmt == "arc":
            choices, labels = list(row["choices"]["text"]), list(row["choices"]["label"])
            true = [labels.index(row["answerKey"])]
        elif fmt == "mmlu":
            choices, true = list(row["choices"]), [int(row["answer"])]
        else:
            target = row["mc1_targets" if fmt == "truthfulqa_mc1" else "mc2_targets"]
            choices = list(target["choices"])
            true = [i for i, y in enumerate(target["labels"]) if y]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TrainingError(f"{where} is not a {fmt} item (fields: {', '.join(row)}); see the formats in "
                            f"training/text/instruct_data.py") from None
    if len(choices) < 2 or not true or any(not 0 <= t < len(choices) for t in true):
        raise TrainingError(f"{where}: a {fmt} item needs >= 2 choices and a valid answer")
    return q, [str(c) for c in choices], true


def detect_format(row: dict) -> str:
    if "answerKey" in row:
        return "arc"
    if "mc2_targets" in row:
        return "truthfulqa_mc2"
    if "mc1_targets" in row:
        return "truthfulqa_mc1"
    return "mmlu"


def load_mc(path: Path, fmt: str | None = None) -> tuple[str, list[tuple[str, list[str], list[int]]]]:
    rows = read_json_records(path)
    fmt = fmt or detect_format(rows[0])
    return fmt, [mc_item(r, fmt, f"{path} item {i}") for i, r in enumerate(rows, 1)]


@torch.no_grad()
def choice_logliks(model, tokenizer, question: str, choices: list[str], device) -> list[float]:
    """Σ log p(choice tokens | "Question: q\\nAnswer:") for each choice, in one padded batch."""
    context = tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]
    conts = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"] for c in choices]
    seqs = [context + c for c in conts]
    n = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs], device=device)
    logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    out = []
    for i, c in enumerate(conts):
        pos = torch.arange(len(context) - 1, len(context) - 1 + len(c), device=device)   # predicts tokens of c
        out.append(float(logp[i, pos, torch.tensor(c, device=device)].sum()))
    return out


def mc_score(fmt: str, logliks: list[float], true: list[int]) -> float:
    """1/0 accuracy of the argmax (arc, mmlu, mc1), or MC2's Σ_true p / Σ_all p (log-sum-exp, stable)."""
    if fmt == "truthfulqa_mc2":
        top = max(logliks)
        p = [math.exp(v - top) for v in logliks]
        return sum(p[i] for i in true) / sum(p)
    return float(max(range(len(logliks)), key=logliks.__getitem__) in true)


def evaluate_mc(model, tokenizer, items, fmt: str, device) -> float:
    was_training = model.training
    model.eval()
    scores = [mc_score(fmt, choice_logliks(model, tokenizer, q, c, device), t) for q, c, t in items]
    model.train(was_training)
    return sum(scores) / len(scores)
