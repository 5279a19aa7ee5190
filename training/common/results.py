"""RUN/results.json for the language trainers, in the shape of peft's method comparison
(peft/method_comparison/*/results/*.json: run_info, train_info, meta_info), and the mean ± std over seeds.

    train_info.initial   the task metric of the untrained model (adapter at init, before step 1)
    train_info.final     the task metric of the selected checkpoint (GLUE: the test part at the best tuning epoch)
    train_info.train_time, accelerator_memory_max (peak bytes), num_trainable_params, num_total_params,
    file_size (bytes of adapter.safetensors), status; run_info.seed; meta_info.package_info (versions)
"""
from __future__ import annotations

import datetime
import math
import resource
import sys
from pathlib import Path

import torch

import lowrank
from ground import runfolder

from .model_card import write_run_card
from .tracking import library_versions


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated by torch on a GPU; on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)   # Linux reports KiB


def write_results(out: Path, *, experiment: str, model, config: lowrank.AdapterConfig, seed: int, initial: dict,
                  final: dict, train_time: float, device: torch.device, model_name: str, dataset: str,
                  extra_train_info: dict | None = None) -> dict:
    params = lowrank.count_parameters(model)
    weights = out / runfolder.ADAPTER_WEIGHTS
    result = {
        "run_info": {"created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "experiment_name": experiment, "seed": seed, "method": config.method,
                     "peft_config": config.to_dict()},
        "train_info": {"initial": initial, "final": final, "train_time": train_time,
                       "accelerator_memory_max": peak_memory_bytes(device),
                       "num_trainable_params": params["trainable"], "num_total_params": params["total"],
                       "file_size": weights.stat().st_size if weights.is_file() else None, "status": "success",
                       **(extra_train_info or {})},
        "meta_info": {"model_info": {"model": model_name}, "dataset_info": {"dataset": dataset},
                      "package_info": library_versions()},
    }
    runfolder.write_json(out / runfolder.RESULTS, result)
    write_run_card(out)   # the card's scores come from results.json
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize_seeds(out: Path, per_seed: dict[int, dict]) -> dict:
    """out/results_summary.json: {metric: {mean, std, values}} of train_info.final over the seeds."""
    keys = sorted({k for r in per_seed.values() for k, v in r["train_info"]["final"].items()
                   if isinstance(v, (int, float))})
    summary = {}
    for k in keys:
        values = [r["train_info"]["final"][k] for r in per_seed.values() if k in r["train_info"]["final"]]
        mean, std = mean_std(values)
        summary[k] = {"mean": mean, "std": std, "values": values}
    data = {"seeds": sorted(per_seed), "final": summary, "runs": {str(s): str(out / f"seed-{s}") for s in per_seed}}
    runfolder.write_json(out / "results_summary.json", data)
    return data
