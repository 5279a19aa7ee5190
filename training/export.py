"""Export a trained adapter so diffusers, ComfyUI / A1111 and peft load it, or as a merged pipeline.

    python -m training.export RUN_OR_ADAPTER_DIR --format diffusers --output DIR
    python -m training.export runs/cat --format kohya --output loras/cat          # loras/cat/cat.safetensors
    python -m training.export runs/dora --format diff --output loras/dora         # DoRA for ComfyUI / A1111
    python -m training.export runs/cat --format pipeline --output sd-cat          # from_pretrained("sd-cat")
    python -m training.export runs/cat/checkpoint-400 --format peft --output out --pipeline BASE
    python -m training.export runs/cat/ema --format diffusers --output out/cat-ema   # the moving average (--ema_decay)
    python -m training.export outputs/glue-sst2-delora --format peft --output out    # a GLUE/instruct run: peft
    python -m training.export outputs/glue-sst2-delora --format merged --output m    # or a merged transformers model

The base model is the run's own (run.json beside the adapter or in its parent) unless --pipeline names
another. It is needed for every format: ETHER's and DeLoRA's exact factors depend on the pretrained
weights, which is also why this command lives in training/ (diffusers) and not in lowrank (torch only).
Bad input (not an adapter folder, unknown format, output is a file, a pair that cannot be exact): one
`error:` line, exit 2.
"""
from __future__ import annotations

import argparse
import sys

import lowrank
from training.common import TrainingError
from training.common.export import FORMATS
from training.exporting import export_run


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):   # one `error:` line, exit 2 (argparse would print the usage block too)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    p.add_argument("source", metavar="RUN_OR_ADAPTER_DIR",
                   help="a run folder (final adapter at its top), a checkpoint-N folder, a run's moving average "
                        "(RUN/ema, RUN/checkpoint-N/ema with --ema_decay) or any lowrank adapter folder")
    p.add_argument("--format", default="diffusers", choices=FORMATS,
                   help="diffusers: pytorch_lora_weights.safetensors for pipe.load_lora_weights(DIR); kohya: "
                        "<DIR name>.safetensors with lora_unet_ keys (ComfyUI, A1111); peft: adapter_config.json + "
                        "adapter_model.safetensors; diff: <DIR name>.safetensors with a full ΔW per layer "
                        "(lora_unet_….diff) that ComfyUI and A1111 apply exactly for any method, DoRA included; "
                        "pipeline: a full diffusers pipeline with the adapter merged; "
                        "merged (GLUE and instruction runs): a transformers model folder with the adapter merged "
                        "and the trained head, for AutoModelFor*.from_pretrained (default: diffusers)")
    p.add_argument("--output", required=True, help="output folder (created; must not be a file)")
    p.add_argument("--pipeline", default=None,
                   help="base pipeline (hub name, local folder or 'tiny'); default: the run's base model")
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:   # argparse already printed its usage and error line (exit 2)
        return int(e.code or 0)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()      # loading bars: noise for a one-line tool
    transformers_logging.disable_progress_bar()
    try:
        written = export_run(args.source, args.output, args.format, pipeline=args.pipeline)
    except (TrainingError, lowrank.AdapterError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
