#!/usr/bin/env python
"""Instruction tuning with lowrank adapters:  accelerate launch training/instruct.py --method delora

The DeLoRA paper's Alpaca setup: AutoModelForCausalLM, adapters on the query and value projections (r = 8), one
epoch, max length 256, Alpaca-format data (instruction, input, output) with the prompt tokens masked out of the
loss. Evaluation: zero-shot multiple choice by log-likelihood on local JSON-lines files (--mc_file; ARC, MMLU and
TruthfulQA MC1/MC2 formats, see training/text/instruct_data.py) before training (results.json `initial`),
after every epoch and at the end (`final`); with lm-evaluation-harness installed (pip install lm-eval) and the hub
reachable, --lm_eval_tasks runs the paper's tasks on the merged model.
With no model or data flag it trains a tiny LLaMA built from a config (RANDOM weights: it shows the machinery,
not language ability) on the embedded instruction set (training/data/alpaca_example.jsonl).

Outputs (output_dir): adapter files, results.json, metrics.jsonl (+ mc/* per epoch), checkpoint-N/, run.json.
Exit codes (training/common/errors.py): 0 done; 1 diverged (the loss or gradient norm NaN/inf) or a write failed;
2 bad input (one `error:` line on stderr); 143 stopped by SIGTERM (a checkpoint at that step is saved).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch training/instruct.py): make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import lowrank
from ground import runfolder
from training.common import TrainingError
from training.common.args import ArgumentParser, add_adapter_args, add_dataset_args, add_run_args
from training.common.loop import TrainingRun
from training.common.results import write_results
from training.common.runtime import run_trainer
from training.common.spec import RunSpec, resolve_run
from training.common.task import Task
from training.common.tasks import INSTRUCT
from training.common.tracking import setup_console
from training.text.instruct_data import (
    EXAMPLE_INSTRUCTIONS,
    EXAMPLE_MC,
    MC_FORMATS,
    causal_lm_loss,
    evaluate_mc,
    instruction_rows,
    load_instructions,
    load_mc,
    pad_batch,
)
from training.text.language import DEFAULT_TARGETS, load_language_model, model_type

logger = setup_console()
DEFAULT_MODEL = "tiny-llama"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(parser, batch_help="Batch size per device.", train_batch_size=4,
                 default_output=INSTRUCT.output_help())
    g = parser.add_argument_group("instruction tuning")
    g.add_argument("--model_name_or_path", default=None,
                   help="Hub name or local folder of a causal LM (e.g. meta-llama/Llama-2-7b-hf); presets: "
                        "'tiny-llama' (the default) and 'tiny-gpt2' (GPT-2 Conv1D layers), both random weights.")
    g.add_argument("--revision", default=None, help="Revision (branch, tag or commit) of the model on the hub.")
    g.add_argument("--train_file", default=None, help="Alpaca-format JSON list, JSON lines or parquet file "
                                                      "(instruction, input, output) (default: the embedded set).")
    add_dataset_args(g, "Instead of --train_file: Alpaca-format data read by the 'datasets' library, its 'train' "
                     "split (or only split): a local save_to_disk folder, a folder of parquet/JSON/CSV files or "
                     "a hub name (e.g. tatsu-lab/alpaca).")
    g.add_argument("--max_seq_length", type=int, default=256, help="Tokens per example after truncation.")
    g.add_argument("--mc_file", action="append", default=None,
                   help="Multiple-choice JSON lines scored zero-shot by log-likelihood (repeatable; default with "
                        "the embedded set: training/data/mc_example.jsonl).")
    g.add_argument("--mc_format", default=None, choices=MC_FORMATS,
                   help="Format of every --mc_file (default: detected from the first item's fields).")
    g.add_argument("--lm_eval_tasks", default=None,
                   help="Comma-separated lm-evaluation-harness tasks run on the merged model at the end "
                        "(needs `pip install lm-eval` and the hub), e.g. mmlu,arc_challenge,truthfulqa_mc2.")
    add_adapter_args(parser)
    parser.set_defaults(validation_steps=None)   # the loop's hook; scoring happens per epoch
    return parser


def parse_args(argv=None) -> RunSpec:
    """The resolved run (training.common.spec) of this command line; TrainingError on bad input."""
    args = build_parser().parse_args(argv)
    spec = resolve_run(args, INSTRUCT)   # a bad method/option fails now, before any model or data
    if args.max_seq_length <= 2:
        raise TrainingError(f"--max_seq_length must be > 2, got {args.max_seq_length}")
    if args.lm_eval_tasks:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise TrainingError("--lm_eval_tasks needs lm-evaluation-harness: pip install lm-eval (or use "
                                "--mc_file with local files)") from None
    if args.train_file and args.dataset_name:
        raise TrainingError("give --train_file or --dataset_name, not both")
    args.example = args.train_file is None and args.dataset_name is None
    if args.mc_file is None:
        args.mc_file = [str(EXAMPLE_MC)] if args.example else []
    return spec


class Encoded(torch.utils.data.Dataset):
    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, k: int) -> dict:
        return self.features[k % len(self.features)]


class Instruct(Task):
    """Next-token cross-entropy on the response tokens; multiple-choice accuracy per epoch."""

    outputs = ""   # results.json comes after fit, named in the last line

    def __init__(self, run: TrainingRun, tokenizer, mc_sets: dict):
        self.run, self.tokenizer, self.mc_sets = run, tokenizer, mc_sets

    def loss(self, model, batch, generator) -> torch.Tensor:
        batch = {k: v.to(self.run.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        return causal_lm_loss(model(**batch).logits, labels)

    def evaluate(self, model) -> dict[str, float]:
        with self.run.accelerator.autocast():
            return {f"mc/{name}": evaluate_mc(model, self.tokenizer, items, fmt, self.run.device)
                    for name, (fmt, items) in self.mc_sets.items()}

    def at_epoch_end(self, epoch: int, step: int) -> dict:
        return self.evaluate(self.run.model)


def run_lm_eval(model, tokenizer, tasks: str) -> dict:
    """The paper's benchmarks through lm-evaluation-harness on the merged model (optional extra)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lowrank.merge(model)
    try:
        out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer), tasks=tasks.split(","))
    finally:
        lowrank.unmerge(model)
    return {task: {k: v for k, v in res.items() if isinstance(v, (int, float))}
            for task, res in out["results"].items()}


def train(spec: RunSpec) -> None:
    args = spec.args
    # the data before the run folder and the model: bad input fails in seconds, with nothing written
    if args.dataset_name:
        rows, source = instruction_rows(args.dataset_name, "--dataset_name", args.cache_dir), args.dataset_name
    else:
        source = args.train_file or str(EXAMPLE_INSTRUCTIONS)
        rows = instruction_rows(source)
    mc_sets = {Path(f).stem: load_mc(Path(f).expanduser(), args.mc_format) for f in args.mc_file}
    run = TrainingRun(spec)
    with run.accelerator.main_process_first():
        model, tokenizer = load_language_model(
            args.model_name_or_path, "causal", default=DEFAULT_MODEL, revision=args.revision,
            torch_dtype=None if run.weight_dtype == torch.float32 else run.weight_dtype)
    model.to(run.device)
    features, dropped = load_instructions(rows, tokenizer, args.max_seq_length)
    if dropped:
        logger.warning("%d example(s) dropped: the prompt alone fills --max_seq_length %d", dropped,
                       args.max_seq_length)
    dataset = Encoded(features)
    max_steps = run.total_steps(len(dataset))
    kind = model_type(model)
    try:
        config, _ = run.adapt(model, max_steps, target_modules=DEFAULT_TARGETS.get(kind, ["q_proj", "v_proj"]))
    except lowrank.TargetError as e:
        raise TrainingError(f"{args.model_name_or_path or DEFAULT_MODEL} ({kind}): {e}; set --target_modules for "
                            f"this architecture") from None
    run.model = model
    task = Instruct(run, tokenizer, mc_sets)
    previous = runfolder.read_json(run.output_dir / runfolder.RUN_JSON, {}) if run.resume_dir else {}
    initial = previous.get("initial") or task.evaluate(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    run.fit(model, task, dataset, lambda feats: pad_batch(feats, pad_id), num_train_steps=max_steps,
            info={"initial": initial, "dataset": source, "train_examples": len(dataset),
                  "dropped_examples": dropped, "mc_files": args.mc_file,
                  "model_name_or_path": args.model_name_or_path or DEFAULT_MODEL,
                  "random_weights": args.model_name_or_path in (None, "tiny-llama", "tiny-gpt2")})
    train_time = time.perf_counter() - t0
    if run.is_main:
        final = task.evaluate(model)
        extra = {"lm_eval": run_lm_eval(model, tokenizer, args.lm_eval_tasks)} if args.lm_eval_tasks else {}
        write_results(run.output_dir, experiment=f"instruct-{config.method}", model=model, config=config,
                      seed=run.seed, initial=initial, final=final, train_time=train_time, device=run.device,
                      model_name=args.model_name_or_path or DEFAULT_MODEL, dataset=source,
                      extra_train_info=extra)
        logger.info("multiple choice: initial %s -> final %s; %s", initial, final, run.output_dir / runfolder.RESULTS)


def main(argv=None) -> int:
    return run_trainer(parse_args, train, argv)


if __name__ == "__main__":
    sys.exit(main())
