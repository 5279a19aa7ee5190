"""The DeLoRA paper's robustness study in one command (Figs. 2-4, App. D Fig. 6, Table 1):

    python -m eval.robustness --ablation                       embedded DreamBooth defaults (tiny SD, CPU)
    python -m eval.robustness --task glue --task_name tweet_polarity --seeds 0 1 2 --jobs 2   real MiniLM, real labels
    python -m eval.robustness --task glue --methods lora delora --lr_factors 1 4 16
    python -m eval.robustness --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --max_train_steps 400 --long_steps 2000 --checkpointing_steps 200 --resolution 512 \\
        --num_validation_images 4 --dino_model facebook/dino-vits16 --clip_model openai/clip-vit-large-patch14
    python -m eval.robustness --protocol peft-image-gen      peft's image-gen benchmark on FLUX.2-klein (one GPU;
                                                             eval/robustness_protocols.py)

Studies (--studies, default all four; --ablation adds Table 1):
  lr      Fig. 2: each method at each factor x its base learning rate, N steps: score and the distance
          ‖W_merged − W_pre‖_F of the figure's layer (the first self-attention's out-projection) vs factor
  long    Fig. 3: one long run per method: that layer's distance over steps, the samples of every checkpoint
  norms   Fig. 4: mean column norm of the pretrained weights per module type (q, k, v, out) and block
  appd    App. D (Fig. 6): DeLoRA with the λ learning rate and the A/B learning rate raised separately
  ablation  Table 1 rows V1 LoRA, V2, V3 DeLoRA, V5, V6, V7, V8 in the paper's order, with parameter counts
Every (method, options, learning rates, length, seed) is an ordinary run folder under OUTPUT_DIR/runs/, trained
by a subprocess of the task's trainer (flags this command does not know go to it unchanged); --jobs N trains N
at a time, each on cores/N threads; --launcher ray trains them as Ray tasks across machines
(eval/robustness_ray.py). With --seeds the tables and figures show mean ± sample std over the seeds.
Each method's base rate is the task's (GLUE's tweet tasks: the rates tuned on them; otherwise the method's
lowrank default), or --base_lrs. GLUE runs are sized in epochs and scored by the trainer (the test part at the
best tuning epoch); their prolonged runs train at a constant rate and are scored after every epoch. A run whose
final adapter exists is reused, an interrupted one resumes from its latest checkpoint, a failed one is a
row of the report with its error line. DeLoRA and the mult_* variants also get their proven bound, drawn
dashed. The report folder holds report.md, results.csv, the PNGs and commands.txt, and from the first run on
progress.json (each run's state: queued, running, trained, reused, failed), which the app's Robustness tab follows.

The defaults are sized for the embedded tiny SD on 2 CPU cores (50 steps per sweep run, 200 per long run,
checkpoints every 25, the trainer's 64 px; with --ablation 41 runs): `python -m eval.robustness --ablation`
took 15 min 53 s end to end on the 2-core CPU (no GPU), all runs trained, distances and bounds measured;
offline the DINO/CLIP scores are reported as unavailable. The paper's scale is the third example
above (its Fig. 2: SD 1.5 at 512 px, 25 prompts x 4 images per score).

Exit status: 0 every run finished; 1 some run failed (the report is still written and lists its error line);
2 bad input (one `error:` line, nothing run).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lowrank import METHODS
from training.common.tasks import DREAMBOOTH

from . import EvalError
from .common import ArgumentParser, run_main
from .drift import DEFAULT_DRIFT_PROMPTS, DRIFT_PROMPTS
from .robustness_protocols import PROTOCOLS, data_flags, trainer_flags
from .robustness_ray import Cluster, run_ray
from .robustness_report import write_report
from .robustness_runs import RunSpec, run_local
from .robustness_tasks import ABLATION_ROWS, TASKS, flag_value

STUDIES = ("lr", "long", "norms", "appd")
RAY_FLAGS = ("ray_address", "cpus_per_run", "gpus_per_run", "max_retries")

def plan(args, task, passthrough: list[str]) -> list[RunSpec]:
    """Every run of the study, seed by seed. The prolonged runs take the first seed only: they are curves."""
    def base_lr(method: str) -> float:
        return task.base_lr(method, passthrough, args.base_lrs)

    n, f1, e = args.max_train_steps, 1.0, args.num_train_epochs
    long_extra = list(task.long_flags)
    specs = []
    for seed in args.seeds:
        def spec(*a, **kw):
            return RunSpec(*a, seed=seed, epochs=kw.pop("epochs", e), **kw)
        if "lr" in args.studies:
            specs += [spec("lr", m, m, f, base_lr(m) * f, n) for m in args.methods for f in args.lr_factors]
        if "long" in args.studies and seed == args.seeds[0]:
            specs += [spec("long", m, m, f1, base_lr(m), args.long_steps, extra=long_extra, epochs=args.long_epochs)
                      for m in args.methods]
        if "appd" in args.studies:
            lr = base_lr("delora")
            specs += [spec("appd", "delora λ-lr ×f", "delora", f, lr, n, lambda_lr=lr * f) for f in args.lr_factors]
            specs += [spec("appd", "delora A/B-lr ×f", "delora", f, lr * f, n, lambda_lr=lr) for f in args.lr_factors]
        if "ablation" in args.studies:
            specs += [spec("ablation", row, m, f1, base_lr(m), n, extra=list(extra))
                      for row, _, m, extra in ABLATION_ROWS]
    return specs


# ----- CLI ------------------------------------------------------------------------------------------------
def _flat(values: list[str]) -> list[str]:
    """A list flag's words, given space-separated (`--methods lora delora`) or comma-separated (`lora,delora`)."""
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def _floats(values: list[str], flag: str) -> list[float]:
    try:
        out = [float(t) for t in _flat(values)]
    except ValueError:
        raise EvalError(f"{flag}: {' '.join(values)!r} is not a list of numbers (e.g. 1 2 4 8 16)") from None
    if not out or any(v <= 0 for v in out):
        raise EvalError(f"{flag}: give positive factors such as 1 2 4 8 16")
    return out


def _base_lrs(values: list[str]) -> dict[str, float]:
    out = {}
    for item in _flat(values):
        method, _, rate = item.partition("=")
        try:
            out[method.strip()] = float(rate)
        except ValueError:
            raise EvalError(f"--base_lrs: {item!r} is not METHOD=RATE (e.g. lora=1e-3 delora=4e-3)") from None
        if out[method.strip()] <= 0:
            raise EvalError(f"--base_lrs: {item!r}: the rate must be positive")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m eval.robustness", description=__doc__.split("\n\n")[0],
                       epilog="Any other flag goes to the trainer unchanged (e.g. --resolution, --rank, "
                              "--pretrained_model_name_or_path, --num_validation_images).")
    p.add_argument("--task", default=DREAMBOOTH.name, choices=sorted(TASKS),
                   help="Which trainer runs the study (default dreambooth).")
    p.add_argument("--methods", nargs="+", default=["lora", "dora", "etherplus", "delora"],
                   help="Methods for Figs. 2-3, space- or comma-separated (default lora dora etherplus delora).")
    p.add_argument("--lr_factors", nargs="+", default=["1", "2", "4", "8", "16"],
                   help="Learning-rate factors x each method's base rate (default 1 2 4 8 16).")
    p.add_argument("--base_lrs", nargs="+", default=[],
                   help="Base rates METHOD=RATE (e.g. lora=1e-3 delora=4e-3) instead of the task's.")
    p.add_argument("--max_train_steps", type=int, default=50, help="Steps N of each sweep run (default 50; GLUE "
                                                                    "runs are sized by --num_train_epochs).")
    p.add_argument("--long_steps", type=int, default=200, help="Steps of each prolonged-training run (default 200; "
                                                               "GLUE: --long_epochs).")
    p.add_argument("--num_train_epochs", type=int, default=None,
                   help="Size each sweep run in epochs instead of steps (GLUE's default: 2).")
    p.add_argument("--long_epochs", type=int, default=None, help="Epochs of each prolonged run (GLUE's default: 8).")
    p.add_argument("--checkpointing_steps", type=int, default=None,
                   help="Checkpoint (adapter + samples) every this many steps (default 25; GLUE 100).")
    p.add_argument("--studies", nargs="+", default=list(STUDIES),
                   help=f"Studies to run, space- or comma-separated (default {' '.join(STUDIES)}).")
    p.add_argument("--ablation", action="store_true", help="Also run DeLoRA Table 1's rows and tabulate them.")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="Seeds: every sweep run once per seed; tables and figures show mean ± sample std "
                        "(default: --seed).")
    p.add_argument("--seed", type=int, default=0, help="The seed when --seeds is not given (default 0).")
    p.add_argument("--jobs", type=int, default=1,
                   help="Runs trained at the same time, each on (CPU cores / jobs) threads unless --num_threads "
                        "is given (default 1). Results do not depend on it at a fixed thread count.")
    ray = p.add_argument_group("where the runs train (README, \"Studies across machines (Ray)\")")
    ray.add_argument("--launcher", default="local", choices=["local", "ray"],
                     help="local: --jobs trainer subprocesses on this machine (default); ray: each run a Ray task "
                          "on a cluster (pip install 'lowrank[ray]'), the study folder on storage every node sees.")
    ray.add_argument("--ray_address", default=None,
                     help="Ray cluster to use: HOST:PORT of its head, or auto for the one started on this machine "
                          "with `ray start` (default: start a local one for this command).")
    ray.add_argument("--cpus_per_run", type=float, default=None,
                     help="CPUs Ray reserves for each run; also the trainer's thread count unless --num_threads is "
                          "given (default 1).")
    ray.add_argument("--gpus_per_run", type=float, default=None,
                     help="GPUs Ray reserves for each run (default 0; 1 on a GPU cluster).")
    ray.add_argument("--max_retries", type=int, default=None,
                     help="Times a run whose Ray worker was lost (process killed, node gone) is started again, "
                          "resuming from its latest checkpoint (default 3). A run that fails on its own is not.")
    p.add_argument("--layer", default=None, help="Module whose distance the figures show (default: the run's "
                                                 "Fig. 3 layer, the first self-attention out-projection; for "
                                                 "models without one, the first adapted layer).")
    p.add_argument("--output_dir", default=None, help="Report folder; runs go to OUTPUT_DIR/runs "
                                                      "(default outputs/robustness-<task>).")
    p.add_argument("--no_scores", action="store_true", help="Skip the task's scores (distances only).")
    p.add_argument("--protocol", default=None, choices=sorted(PROTOCOLS),
                   help="A benchmark's setting as defaults of this command's flags and the trainer's; a flag given "
                        "here wins (eval/robustness_protocols.py). " +
                        " ".join(f"{p.name}: {p.about}." for p in PROTOCOLS.values()))
    p.add_argument("--protocol_data", default=None,
                   help="Where a protocol's data set is, a hub name or a local `datasets` source (default: the "
                        "protocol's own, e.g. peft-internal-testing/cat-image-dataset); laid out once under "
                        "OUTPUT_DIR/data/.")
    scores = p.add_argument_group("scores (DreamBooth: eval.subject)")
    scores.add_argument("--dino_model", default=None, help="DINO ViT, hub name or local folder (default: "
                                                           "eval.subject's).")
    scores.add_argument("--clip_model", default=None, help="CLIP model, hub name or local folder (default: "
                                                           "eval.subject's).")
    scores.add_argument("--max_prompts", type=int, default=2,
                        help="DreamBooth prompts per score (default 2; the paper's protocol: 25).")
    scores.add_argument("--images_per_prompt", type=int, default=2,
                        help="Images per prompt per score (default 2; the paper's protocol: 4).")
    scores.add_argument("--drift_prompts", type=int, default=DEFAULT_DRIFT_PROMPTS,
                        help=f"peft's drift prompts per score (eval.subject's drift; default {DEFAULT_DRIFT_PROMPTS}; "
                             f"peft's protocol: {len(DRIFT_PROMPTS)}; 0: no drift). The base model's drift images "
                             f"are made once into OUTPUT_DIR/drift-base and shared by the study's runs.")
    return p


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    protocol = PROTOCOLS.get(parser.parse_known_args(argv)[0].protocol)
    if protocol:   # the protocol's values become the defaults: what the command line gives still wins
        parser.set_defaults(task=protocol.task, output_dir=f"outputs/robustness-{protocol.name}", **protocol.study)
    args, passthrough = parser.parse_known_args(argv)
    if protocol and args.task != protocol.task:
        raise EvalError(f"--protocol {protocol.name} is a {protocol.task} study; leave --task out")
    if args.protocol_data and not protocol:
        raise EvalError("--protocol_data names a protocol's data set: give --protocol too")
    task = TASKS[args.task]
    args.methods, args.studies = _flat(args.methods), _flat(args.studies)
    args.lr_factors = _floats(args.lr_factors, "--lr_factors")
    args.base_lrs = {**(protocol.base_lrs if protocol else {}), **_base_lrs(args.base_lrs)}   # per method
    for key, value in task.defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.checkpointing_steps = args.checkpointing_steps or 25
    args.seeds = args.seeds or [args.seed]
    if len(set(args.seeds)) != len(args.seeds):
        raise EvalError(f"--seeds has duplicates: {args.seeds}")
    for flag in ("max_train_steps", "long_steps", "checkpointing_steps", "max_prompts", "images_per_prompt", "jobs",
                 "num_train_epochs", "long_epochs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise EvalError(f"--{flag} must be at least 1")
    if not 0 <= args.drift_prompts <= len(DRIFT_PROMPTS):
        raise EvalError(f"--drift_prompts {args.drift_prompts}: give 0 (no drift) to {len(DRIFT_PROMPTS)}")
    for i, word in enumerate(passthrough):   # a trainer flag takes one value: a second bare word is a stray
        if not word.startswith("-") and (i == 0 or not passthrough[i - 1].startswith("-")):
            raise EvalError(f"{word!r} belongs to no flag: give a list flag's values together (--methods lora "
                            f"delora) and each trainer flag as --flag value")
    unknown = [m for m in args.methods + list(args.base_lrs) if m not in METHODS]
    if unknown:
        raise EvalError(f"--methods/--base_lrs: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    bad = [s for s in args.studies if s not in STUDIES + ("ablation",)]
    if bad:
        raise EvalError(f"--studies: unknown {', '.join(bad)}; known: {', '.join(STUDIES)}, ablation")
    if args.ablation and "ablation" not in args.studies:
        args.studies.append("ablation")
    for own in ("--output_dir", "--method", "--learning_rate", "--lambda_learning_rate", "--resume_from_checkpoint"):
        if any(a == own or a.startswith(own + "=") for a in passthrough):
            raise EvalError(f"{own} is set by the study for each run; leave it out")
    check_launcher(args)
    given = flag_value(passthrough, "--num_threads")   # goes to the trainer as it is; recorded in machine.json
    args.threads_given = given is not None
    try:
        args.threads_per_run = int(given) if given else (
            max(1, int(args.cpus_per_run)) if args.launcher == "ray" else
            max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None)
    except ValueError:
        raise EvalError(f"--num_threads {given!r} is not a whole number") from None
    args.output_dir = Path(args.output_dir or f"outputs/robustness-{args.task}").expanduser().resolve()
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise EvalError(f"--output_dir {args.output_dir} is a file; name a folder")
    return args, passthrough + (trainer_flags(protocol, passthrough) if protocol else [])


def check_launcher(args) -> None:
    """The Ray flags: only with --launcher ray, where they get their defaults; --jobs is the local launcher's."""
    if args.launcher == "local":
        given = [f"--{f}" for f in RAY_FLAGS if getattr(args, f) is not None]
        if given:
            raise EvalError(f"{', '.join(given)}: only with --launcher ray")
        return
    if args.jobs != 1:
        raise EvalError("--jobs is the local launcher's: with --launcher ray, Ray runs as many at a time as "
                        "--cpus_per_run / --gpus_per_run fit on the cluster")
    for flag, default in (("cpus_per_run", 1.0), ("gpus_per_run", 0.0), ("max_retries", 3)):
        if getattr(args, flag) is None:
            setattr(args, flag, default)
        if getattr(args, flag) < 0:
            raise EvalError(f"--{flag} must be at least 0")


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse(argv)
    task = TASKS[args.task]
    task.check()   # a trainer that does not exist yet: one error line, before anything runs
    cluster = Cluster(args) if args.launcher == "ray" else None   # Ray there, reachable, the folder shared
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        if args.protocol:   # its data set laid out for the trainer (once), unless the command line names other data
            passthrough += data_flags(PROTOCOLS[args.protocol], args.output_dir, args.protocol_data, passthrough)
        specs = plan(args, task, passthrough)
        t0 = time.perf_counter()
        results = run_ray(specs, args, task, passthrough, cluster) if cluster else \
            run_local(specs, args, task, passthrough)
        args.wall_time = time.perf_counter() - t0
        args.ray_cluster = cluster.describe(args) if cluster else None
    finally:
        if cluster:
            cluster.close()
    report = write_report(results, args, task, passthrough, argv if argv is not None else sys.argv[1:])
    failed = sum(r.status == "failed" for r in {r.spec.name: r for r in results}.values())
    print(f"report: {report}" + (f" ({failed} run(s) failed: see the table)" if failed else ""))
    return 1 if failed else 0   # the report is written either way; a script must still see that runs failed


def cli(argv: list[str] | None = None) -> int:
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
