"""Subject fidelity and prompt fidelity of generated images (DreamBooth's metrics, as the DeLoRA
and ETHER papers report them):

    DINO    mean cosine of DINO ViT-S/16 CLS embeddings over every (real, generated) pair
    CLIP-I  mean cosine of CLIP image embeddings over every (real, generated) pair
    CLIP-T  mean cosine of CLIP image and prompt embeddings over the generated images (no logit scale)

    python -m eval.subject --real_dir photos/ --generated_dir gen/ --output scores.json
    python -m eval.subject --run_dir outputs/dog-delora --checkpoints all

A generated folder holds prompts.jsonl, one {"image": file, "prompt": text} per line. With --run_dir
the protocol's images (25 DreamBooth prompts x 4 fixed seeds) are generated from each chosen
checkpoint into RUN/eval/step-N/ (kept, and reused while the adapter and settings are unchanged), and
one row per checkpoint is written to RUN/eval.jsonl: score-versus-step curves for long training. Each row
also has the checkpoint's drift (eval/drift.py, peft's measure: the base model's and the checkpoint's images of
--drift_prompts unrelated prompts, same seeds and settings; (1 - mean DINO cosine) / 2, lower is better).
With --average the run's moving average (--ema_decay: checkpoint-N/ema/, ema/) is scored instead, into RUN/ema/eval/
and RUN/ema/eval.jsonl (the base model's drift images shared with the trained adapters' scoring).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from ground.runfolder import (
    ADAPTER_FILES,
    EMA_DIR,
    final_step,
    is_adapter_dir,
    list_checkpoints,
    read_run,
    run_setting,
    write_json,
)
from training.common.args import file_in_the_way

from . import EvalError, drift, generate
from .common import ArgumentParser, logger, run_main, update_eval_file
from .embed import CLIP_MODEL, DINO_MODEL, ClipEmbedder, DinoEmbedder, resolve_device
from .images import Loaded, load_folder, load_generated
from .prompts import IMAGES_PER_PROMPT, protocol_prompts, subject_of


# ----- scoring (no lowrank, no diffusers) --------------------------------------------------------
def score_images(real: list, generated: list, dino: DinoEmbedder, clip: ClipEmbedder) -> dict:
    """real: [(name, image)], generated: [(name, image, prompt)] -> scores + one row per prompt."""
    real_imgs = [img for _, img, *_ in real]
    gen_imgs = [img for _, img, _ in generated]
    prompts = [p for *_, p in generated]
    dino_pairs = dino.images(gen_imgs, "DINO generated") @ dino.images(real_imgs, "DINO real").T   # (gen, real)
    gen_clip = clip.images(gen_imgs, "CLIP generated")
    clip_pairs = gen_clip @ clip.images(real_imgs, "CLIP real").T
    clip_text = (gen_clip * clip.texts(prompts)).sum(-1)                                          # (gen,)
    rows = []
    for prompt in dict.fromkeys(prompts):
        idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        rows.append({"prompt": prompt, "n_generated": len(idx), "dino": dino_pairs[idx].mean().item(),
                     "clip_i": clip_pairs[idx].mean().item(), "clip_t": clip_text[idx].mean().item()})
    return {"dino": dino_pairs.mean().item(), "clip_i": clip_pairs.mean().item(), "clip_t": clip_text.mean().item(),
            "n_real": len(real_imgs), "n_generated": len(gen_imgs), "prompts": rows}


def score_loaded(real: Loaded, generated: Loaded, dino: DinoEmbedder, clip: ClipEmbedder) -> dict:
    result = score_images(real.items, generated.items, dino, clip)
    skipped = [f"real/{s}" for s in real.skipped] + [f"generated/{s}" for s in generated.skipped]
    return {**result, "n_skipped": len(skipped), "skipped": skipped, "dino_model": dino.name,
            "clip_model": clip.name}


def summary(result: dict) -> str:
    drifted = f"  drift {result['drift']:.4f}" if result.get("drift") is not None else ""
    return (f"dino {result['dino']:.4f}  clip_i {result['clip_i']:.4f}  clip_t {result['clip_t']:.4f}{drifted}  "
            f"({result['n_generated']} generated x {result['n_real']} real)")


# ----- a trained run ------------------------------------------------------------------------------
def choose_checkpoints(run_dir: Path, run: dict, which: str, sub: str = "") -> list[tuple[int, Path]]:
    """(step, adapter folder) for `which`: all, last, or steps "N,M". The final adapter in RUN/ counts
    as the last step unless a checkpoint already has that step. sub=ema/: each one's moving average instead."""
    available = {step: path / sub for step, path in list_checkpoints(run_dir) if is_adapter_dir(path / sub)}
    if is_adapter_dir(run_dir / sub):
        step = final_step(run_dir, run)
        if isinstance(step, int) and step not in available:
            available[step] = run_dir / sub
    if not available and sub:
        raise EvalError(f"{run_dir} has no moving average to score (no checkpoint-N/{sub}/ or {sub}/): train it "
                        f"with --ema_decay, or score its adapters without --average")
    if not available:
        raise EvalError(f"{run_dir} has no adapter to score: no checkpoint-N/ or final adapter with "
                        f"{' + '.join(ADAPTER_FILES)}")
    steps = sorted(available)
    if which == "all":
        chosen = steps
    elif which == "last":
        chosen = steps[-1:]
    else:
        try:
            chosen = sorted({int(s) for s in which.split(",") if s.strip()})
        except ValueError:
            raise EvalError(f"--checkpoints {which!r}: use all, last, or steps such as 200,400") from None
        missing = [s for s in chosen if s not in available]
        if missing or not chosen:
            raise EvalError(f"--checkpoints {which!r}: no adapter for step(s) {missing or which}; "
                            f"{run_dir} has {', '.join(map(str, steps))}")
    return [(s, available[s]) for s in chosen]


def file_digest(folder: Path) -> str:
    h = hashlib.sha1()
    for name in ADAPTER_FILES:
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def run_prompts(args, run: dict) -> list[str]:
    if args.prompts_file:
        try:
            lines = [l.strip() for l in Path(args.prompts_file).read_text().splitlines() if l.strip()]
        except OSError as e:
            raise EvalError(f"--prompts_file {args.prompts_file}: {e.strerror or e}") from None
        if not lines:
            raise EvalError(f"--prompts_file {args.prompts_file} is empty")
    else:
        lines = None
    token, noun = args.unique_token, args.class_noun
    if not (token and noun) and (lines is None or any("{" in l for l in lines)):
        t, n = subject_of(run_setting(run, "instance_prompt", ""), run_setting(run, "class_prompt"))
        token, noun = token or t, noun or n
    try:
        prompts = [l.format(token, noun) for l in lines] if lines else protocol_prompts(token, noun, args.subject_kind)
    except (IndexError, KeyError, ValueError) as e:
        raise EvalError(f"--prompts_file {args.prompts_file}: a line has a placeholder other than {{0}}/{{1}} "
                        f"({type(e).__name__}: {e})") from None
    return prompts[: args.max_prompts] if args.max_prompts else prompts


def plan_run(args) -> dict:
    """Everything about a run that can be wrong, checked before any model loads."""
    run_dir = Path(args.run_dir).expanduser()
    run = read_run(run_dir)
    sub = EMA_DIR if args.average else ""
    chosen = choose_checkpoints(run_dir, run, args.checkpoints, sub)
    prompts = run_prompts(args, run)
    resolution = args.resolution or int(run_setting(run, "resolution", 512))
    gen = {"prompts": prompts, "images_per_prompt": args.images_per_prompt, "seed": args.seed,
           "num_inference_steps": args.num_inference_steps or int(run_setting(run, "num_inference_steps", 50)),
           "guidance_scale": args.guidance_scale or float(run_setting(run, "guidance_scale", 7.5)),
           "resolution": resolution,   # the scheduler is the run's family's; generation.json records it
           "base_model": run_setting(run, "pretrained_model_name_or_path") or "tiny",
           "safety_checker": not args.disable_safety_checker}
    if args.real_dir:
        real = load_folder(args.real_dir, "--real_dir").items
    else:
        real = generate.run_real_images(run, resolution)
    return {"run_dir": run_dir, "out_dir": run_dir / sub, "run": run, "chosen": chosen, "prompts": prompts,
            "gen": gen, "real": real, "drift": drift.plan(args, run_dir, run, gen)}


def score_run(plan: dict, args, dino: DinoEmbedder, clip: ClipEmbedder, device: torch.device) -> list[dict]:
    """Generate (or reuse) each chosen checkpoint's images, score them (and their drift), update RUN/eval.jsonl
    (with --average: RUN/ema/eval.jsonl)."""
    run_dir, out_dir, run, prompts, gen, real = (plan[k] for k in ("run_dir", "out_dir", "run", "prompts", "gen",
                                                                   "real"))
    # the pipeline loads only when some checkpoint (or the base model's drift images) needs images
    sampler = generate.Sampler(run, device, gen, args.gen_batch_size,
                               keep_safety_checker=not args.disable_safety_checker)
    measure_drift = drift.Drift(plan["drift"], out_dir, sampler, dino, args.regenerate) if plan["drift"] else None
    out = []
    for step, adapter_dir in plan["chosen"]:
        images_dir = out_dir / "eval" / f"step-{step}"
        digest = file_digest(adapter_dir)
        settings = {**gen, "step": step, "adapter": str(adapter_dir), "adapter_sha1": digest}
        blacked = sampler.ensure(adapter_dir, prompts, images_dir, args.images_per_prompt, settings, args.regenerate)
        if blacked:
            logger.warning("step %d: the safety checker blacked out %d image(s); they score as failures "
                           "(--disable_safety_checker to keep them)", step, blacked)
        generated = load_generated(images_dir, f"images of step {step}")
        result = score_images(real, generated.items, dino, clip)
        result.update(step=step, checkpoint=adapter_dir.relative_to(run_dir).as_posix() if adapter_dir != out_dir
                      else "final", **({"average": EMA_DIR} if out_dir != run_dir else {}),
                      images=str(images_dir), dino_model=dino.name, clip_model=clip.name,
                      n_skipped=len(generated.skipped))
        if measure_drift is not None:
            result.update(measure_drift(step, adapter_dir, digest))
        write_json(images_dir / "scores.json", result)
        update_eval_file(out_dir, {k: v for k, v in result.items() if k != "prompts"},
                         ("step", "dino_model", "clip_model"))
        print(f"step {step}: {summary(result)}", file=sys.stderr)
        out.append(result)
    return out


# ----- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m eval.subject", description="\n\n".join(__doc__.split("\n\n")[:2]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to score (a folder pair, or a trained run)")
    src.add_argument("--real_dir", help="folder of real subject photos (with --run_dir: overrides the run's "
                                        "instance_data_dir)")
    src.add_argument("--generated_dir", help="folder of generated images with prompts.jsonl")
    src.add_argument("--run_dir", help="a training run folder (run.json, checkpoint-N/): generate the protocol's "
                                       "images from its adapters and append scores to RUN/eval.jsonl")
    src.add_argument("--checkpoints", default="all", help="with --run_dir: all, last, or steps such as 200,400 "
                                                          "(default all; the final adapter counts as its step)")
    src.add_argument("--average", action="store_true",
                     help="with --run_dir: score the run's moving average (trained with --ema_decay: "
                          "checkpoint-N/ema/, ema/) instead of its adapters; images and rows go to RUN/ema/eval/ "
                          "and RUN/ema/eval.jsonl (default: off)"),
    models = p.add_argument_group("models")
    models.add_argument("--dino_model", default=DINO_MODEL, help=f"DINO ViT, hub name or local folder (default "
                                                                 f"{DINO_MODEL})")
    models.add_argument("--clip_model", default=CLIP_MODEL, help=f"CLIP model, hub name or local folder (default "
                                                                 f"{CLIP_MODEL})")
    models.add_argument("--device", default="auto", help="torch device for all models (default: cuda if available)")
    models.add_argument("--batch_size", type=int, default=16, help="images per embedding batch (default 16)")
    gen = p.add_argument_group("generation (--run_dir)")
    gen.add_argument("--images_per_prompt", type=int, default=IMAGES_PER_PROMPT,
                     help=f"images per prompt, seeds SEED..SEED+N-1 (default {IMAGES_PER_PROMPT})")
    gen.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    gen.add_argument("--gen_batch_size", type=int, default=8, help="images per pipeline call (default 8)")
    gen.add_argument("--num_inference_steps", type=int, help="sampling steps (default: the run's, else 50)")
    gen.add_argument("--guidance_scale", type=float, help="classifier-free guidance (default: the run's, else 7.5)")
    gen.add_argument("--resolution", type=int, help="image size (default: the run's resolution)")
    gen.add_argument("--unique_token", help="subject token (default: from the run's instance_prompt, e.g. sks)")
    gen.add_argument("--class_noun", help="class noun (default: from the run's instance/class prompts, e.g. dog)")
    gen.add_argument("--subject_kind", default="auto", choices=["auto", "object", "live"],
                     help="DreamBooth prompt list: live for cats/dogs, object otherwise (default auto)")
    gen.add_argument("--prompts_file", help="one prompt per line instead of DreamBooth's ({0}=token, {1}=class)")
    gen.add_argument("--max_prompts", type=int, help="use only the first N prompts (quick checks)")
    gen.add_argument("--regenerate", action="store_true", help="regenerate images even if RUN/eval/step-N matches")
    gen.add_argument("--disable_safety_checker", action="store_true",
                     help="keep images the safety checker would black out (they would score as failures)")
    dr = p.add_argument_group("drift (--run_dir): (1 - mean DINO cosine of base and adapted images) / 2 on "
                                "prompts unrelated to the subject (eval/drift.py)")
    dr.add_argument("--drift_prompts", type=int, default=drift.DEFAULT_DRIFT_PROMPTS,
                    help=f"the first N of peft's {len(drift.DRIFT_PROMPTS)} drift prompts, one image each from "
                         f"--seed (default {drift.DEFAULT_DRIFT_PROMPTS}; peft's protocol: "
                         f"{len(drift.DRIFT_PROMPTS)}; 0: no drift)")
    dr.add_argument("--drift_base_dir", help="folder of the base model's drift images, made once per settings "
                                             "(default RUN/eval/drift-base; runs of one base model can share one)")
    p.add_argument("--output", help="also write the scores as JSON here (default: print them to stdout; "
                                      "with --run_dir they are always in RUN/eval.jsonl)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.run_dir and args.generated_dir:
        raise EvalError("give either --run_dir or --generated_dir (with --real_dir), not both")
    if args.average and not args.run_dir:
        raise EvalError("--average scores a run's moving average: give --run_dir")
    if not args.run_dir and not (args.real_dir and args.generated_dir):
        raise EvalError("give --real_dir and --generated_dir, or --run_dir")
    for flag in ("batch_size", "images_per_prompt", "gen_batch_size", "max_prompts", "num_inference_steps",
                 "resolution"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise EvalError(f"--{flag} must be at least 1")
    if args.output:   # checked now, not after minutes of scoring
        out = Path(args.output).expanduser()
        bad = file_in_the_way(out.parent)
        if out.is_dir() or bad is not None:
            raise EvalError(f"--output {out}: {'it is a folder' if bad is None else f'{bad} is a file'}; "
                            f"name a .json file in a folder")
    device = resolve_device(args.device)
    # inputs first (milliseconds), then the scoring models (seconds), then Stable Diffusion (minutes):
    # whatever is wrong fails as early as it can
    if args.run_dir:
        plan = plan_run(args)
    else:
        real, generated = load_folder(args.real_dir, "--real_dir"), load_generated(args.generated_dir)
    dino = DinoEmbedder(args.dino_model, device, args.batch_size)
    clip = ClipEmbedder(args.clip_model, device, args.batch_size)
    if args.run_dir:
        result = score_run(plan, args, dino, clip, device)
    else:
        result = score_loaded(real, generated, dino, clip)
        print(summary(result), file=sys.stderr)
    if args.output:
        write_json(args.output, result, parents=True)
    elif not args.run_dir:   # a run's scores are in RUN/eval.jsonl and RUN/eval/step-N/scores.json
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
