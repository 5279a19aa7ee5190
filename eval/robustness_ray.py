"""`eval.robustness --launcher ray`: every run of the study is a Ray task (--cpus_per_run, --gpus_per_run) on a
cluster (--ray_address; none: a local one started here), writing its run folder into the study folder, which
every node must see at the same path. The report is written here once every run has ended.

Ray is optional (`pip install 'lowrank[ray]'`): it is imported in `load_ray` only. Before any run starts, the
command checks that Ray is installed, that the cluster answers, and that a worker on every node can write into
the study folder where this machine sees the file; each failure is one error line.

A task runs the local launcher's trainer command (eval/robustness_worker.py). A run whose worker is lost (the
process killed, the node gone) is retried up to --max_retries times, resuming from its latest checkpoint; a run
that fails on its own (bad input, divergence) is reported as failed, not retried. Finished runs are reused."""
from __future__ import annotations

import importlib
import logging
import os
import socket
import uuid
from pathlib import Path

from . import EvalError
from . import robustness_worker as worker
from .robustness_progress import Progress
from .robustness_runs import Launch, RunResult, RunSpec, distinct, launch, outcome, per_spec
from .robustness_tasks import ROOT

# the driver's settings that reach the trainers on every node: the project's own, and staying offline
FORWARDED_ENV = ("LOWRANK_", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
CONNECT_TIMEOUT_S = 5
PROBE_TIMEOUT_S = 120
SHARED = "the study folder must be on storage every node sees, at the same path (a shared file system)"


def load_ray():
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise EvalError("--launcher ray needs Ray, which is not installed: pip install 'lowrank[ray]' (or "
                        "'ray>=2.9'), or leave --launcher out to train here") from None


def check_address(address: str | None) -> None:
    """A cluster address must answer before ray.init, which would wait minutes for one that never does."""
    if address in (None, "auto"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise EvalError(f"--ray_address {address}: no Ray cluster answers there ({reason}); start one with "
                        f"`ray start --head` and give its address, or leave --ray_address out to start one "
                        f"here") from None


class Cluster:
    """The Ray connection of one command: released at the end if the command made it."""

    def __init__(self, args):
        self.ray = ray = load_ray()
        check_address(args.ray_address)
        self.owned = not ray.is_initialized()   # a process already connected (a notebook, a test) keeps its own
        if self.owned:
            local = {} if args.ray_address else {"include_dashboard": False}
            if not args.ray_address:   # a cluster this command starts sends no usage statistics
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            try:
                # "local": a new instance, never one a `ray start` on this machine left (use auto for that)
                ray.init(address=args.ray_address or "local", log_to_driver=False, logging_level=logging.WARNING,
                         **local)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise EvalError(f"--ray_address {args.ray_address}: cannot connect to Ray "
                                f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
        ray.cloudpickle.register_pickle_by_value(worker)   # the tasks' code travels with them
        self.nodes = [n for n in ray.nodes() if n.get("Alive")]
        try:
            self.check_storage(args.output_dir)
        except BaseException:
            self.close()
            raise

    def on_node(self, node: dict) -> dict:
        strategy = self.ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        return {"num_cpus": 0, "scheduling_strategy": strategy}

    def check_storage(self, folder: Path) -> None:
        """A worker on every node writes a probe file into the study folder; this machine must read it."""
        ray, token = self.ray, uuid.uuid4().hex
        write, remove = ray.remote(worker.write_probe), ray.remote(worker.remove_probe)
        probes = [(node, f".ray-probe-{token}-{i}") for i, node in enumerate(self.nodes)]
        refs = [write.options(**self.on_node(n)).remote(str(folder), name, token) for n, name in probes]
        for (node, name), ref in zip(probes, refs):
            where = node.get("NodeManagerAddress", "?")
            try:
                failed = ray.get(ref, timeout=PROBE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                failed = f"no answer in {PROBE_TIMEOUT_S} s"
            if failed:
                raise EvalError(f"--output_dir {folder}: a Ray worker on {where} cannot write there ({failed}); "
                                f"{SHARED}")
            probe = folder / name
            if not probe.is_file() or probe.read_text() != token:
                ray.get(remove.options(**self.on_node(node)).remote(str(folder), name))
                raise EvalError(f"--output_dir {folder}: a file a Ray worker on {where} wrote there is not visible "
                                f"here; {SHARED}")
            probe.unlink()

    def describe(self, args) -> dict:
        """machine.json's record of where the runs trained."""
        total = self.ray.cluster_resources()
        return {"address": args.ray_address or "local", "nodes": len(self.nodes), "cpus": total.get("CPU", 0),
                "gpus": total.get("GPU", 0), "cpus_per_run": args.cpus_per_run, "gpus_per_run": args.gpus_per_run,
                "max_retries": args.max_retries}

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


def attempts_file(run: Launch) -> Path:
    return run.log.with_suffix(".attempts.jsonl")


def run_ray(specs: list[RunSpec], args, task, passthrough: list[str], cluster: Cluster) -> list[RunResult]:
    """Every distinct run as a Ray task, the longest first; the bar counts runs done / running / failed."""
    ray = cluster.ray
    unique = distinct(specs)
    progress, done, pending = Progress({s.name: s.length for s in unique}, args.output_dir, "ray"), {}, {}
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    train = ray.remote(worker.train_run).options(num_cpus=args.cpus_per_run, num_gpus=args.gpus_per_run,
                                                 max_retries=args.max_retries, retry_exceptions=False)
    for spec in unique:
        run = launch(spec, args, task, passthrough)
        if isinstance(run, RunResult):
            done[spec.name] = run
            progress.ended(run)
            continue
        attempts_file(run).unlink(missing_ok=True)   # this command's first attempt is not a retry
        pending[train.remote(run.command, str(run.log), str(attempts_file(run)), str(ROOT), env)] = run
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        ended = [(ref, pending.pop(ref)) for ref in ready]
        progress.set_running(run.spec.name for run in pending.values() if attempts_file(run).is_file())
        for ref, run in ended:
            try:
                result = outcome(run, ray.get(ref))
            except ray.exceptions.RayTaskError as e:   # the task's own code raised: not a lost worker
                result = RunResult(run.spec, run.folder, "failed", f"the Ray task failed: "
                                   f"{str(e).strip().splitlines()[-1][:200]} (log: {run.log})", run.command)
            except ray.exceptions.RayError as e:
                result = RunResult(run.spec, run.folder, "failed", f"its Ray worker was lost "
                                   f"{args.max_retries + 1} time(s) ({type(e).__name__}); run the command again "
                                   f"to resume it from its latest checkpoint (log: {run.log})", run.command)
            done[run.spec.name] = result
            progress.ended(result)
    progress.close()
    return per_spec(specs, done)
