"""The app's logic behind the UI, testable without Gradio: the one way the tabs reach jobs and run folders.
Submit a training batch (subject or semantic map), follow it, cancel it, score runs, build a report, list and
compare runs, generate from a checkpoint and export its adapter; the tab modules (app/tab_*.py) turn these
into components and events.
"""
from __future__ import annotations

import html
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ground.runfolder import EMA_DIR, EVAL, is_adapter_dir
from training.common.tasks import SEMANTIC_MAP

from . import commands, compare, runs
from .generate import Generator, checkpoint_choices, export
from .inputs import (
    EXAMPLE_SUBJECT,
    MAX_IMAGE_MB,
    MAX_IMAGES,
    MIN_IMAGES,
    InputError,
    TrainForm,
    check_images,
    save_images,
)
from .jobs import Job, JobQueue
from .runs import RunInfo
from .semantic import stage_pairs


@dataclass(frozen=True)
class Scoring:
    """One scoring job "Score" queues per run: of its adapters (RUN/eval.jsonl) or of its moving average."""
    label: str          # after the run's name in messages
    flags: tuple        # eval.subject's, after --run_dir
    log: str            # the job's log file in RUN/
    folder: str = ""    # where its eval.jsonl lands, under RUN/

    def applies(self, run: Path) -> bool:
        return not self.folder or is_adapter_dir(run / self.folder)

    def done(self, run: Path) -> bool:
        return (run / self.folder / EVAL).is_file()


SCORINGS = {"eval": Scoring("", (), runs.EVAL_LOG),
            "eval-ema": Scoring(" (EMA)", ("--average",), runs.EVAL_EMA_LOG, EMA_DIR)}   # with --ema_decay


@dataclass
class Progress:
    """A snapshot of a batch of jobs, for the progress bar and the status text."""
    done: bool
    fraction: float
    lines: list[str] = field(default_factory=list)
    runs: list[RunInfo] = field(default_factory=list)

    def markdown(self) -> str:
        return "\n".join(self.lines)

    def summary(self) -> list[dict]:
        """The batch as plain data (the /start API's last output)."""
        return [{"name": r.name, "method": r.method, "status": r.status, "step": r.step,
                 "total_steps": r.total_steps, "loss": r.loss, "detail": r.detail} for r in self.runs]

    def bar_html(self) -> str:
        pct = max(0.0, min(100.0, 100.0 * self.fraction))
        state = "done" if self.done else "running"
        label = "All runs done" if self.done else f"{pct:.0f}%"
        return (f'<div class="lr-progress" data-state="{state}" data-pct="{pct:.0f}">'
                f'<div class="lr-progress-bar" style="width:{pct:.1f}%"></div>'
                f'<span class="lr-progress-label">{html.escape(label)}</span></div>')


class Service:
    def __init__(self, runs_dir: Path, launcher: str = "accelerate", grace_s: float = 10.0,
                 max_image_mb: float = MAX_IMAGE_MB, queue: JobQueue | None = None,
                 generator: Generator | None = None, scorer: list[str] | None = None,
                 reporter: list[str] | None = None, eval_args: list[str] | None = None):
        self.runs_dir = Path(runs_dir).expanduser().resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.launcher = launcher
        self.max_image_mb = max_image_mb
        self.queue = queue or JobQueue(grace_s=grace_s)
        self.generator = generator or Generator()
        self.scorer = list(scorer or commands.SCORER)          # overridable: tests use a stand-in
        self.reporter = list(reporter or commands.REPORTER)
        self.eval_args = list(eval_args or [])                 # e.g. --dino_model/--clip_model folders (CLI only)

    # ----- runs -----------------------------------------------------------------------------------
    def runs(self) -> list[RunInfo]:
        return runs.list_runs(self.runs_dir)

    def run_infos(self, names) -> list[RunInfo]:
        """RunInfo for names chosen in the UI (unknown or unsafe names are skipped)."""
        out = []
        for name in names or []:
            try:
                out.append(runs.find(self.runs_dir, name))
            except ValueError:
                continue
        return out

    def empty_state(self) -> str:
        """What Compare and Generate say with no run chosen: how to get runs when the folder has none."""
        if self.runs():
            return "Choose runs above."
        return (f"No runs in {self.runs_dir} yet: train one in the Train tab, or run a trainer with no "
                f"--output_dir (it writes under outputs/), or start the app with --runs_dir where your runs are.")

    def run_choices(self) -> list[tuple[str, str]]:
        """(label, name) per run; a study's runs are labelled `study ▸ ...` and listed together."""
        return [(f"{r.study + ' ▸ ' if r.study else ''}{r.method}{'' if r.rank is None else f' r{r.rank}'} · "
                 f"{r.name.rsplit('/', 1)[-1]} [{r.status}]", r.name) for r in self.runs()]

    # ----- training -------------------------------------------------------------------------------
    def check_upload(self, files) -> str:
        return f"{len(check_images(files, max_mb=self.max_image_mb))} images ready."

    def submit(self, files, form: TrainForm, embedded: bool = False) -> list[str]:
        """Validate everything first, then create one run folder per method and queue the runs in
        order. Returns the run names (= job ids). Raises InputError with nothing written. With `embedded`
        the runs train on the trainer's example subject (no --instance_data_dir, as the CLI) and `files`
        are not used."""
        if not embedded and not files:
            raise InputError(f"Upload {MIN_IMAGES}–{MAX_IMAGES} images of the subject first, or tick "
                             f"'Train on the {EXAMPLE_SUBJECT}'.")
        images = [] if embedded else check_images(files, max_mb=self.max_image_mb)
        form.model = commands.check_model(form.model)
        names = []
        batch = time.strftime("%Y%m%d-%H%M%S")
        for method in form.methods:
            run_dir = runs.new_run_dir(self.runs_dir, method, form.rank, stamp=batch)
            instance = None if embedded else run_dir / "instance_images"
            if instance is not None:
                save_images(images, instance)
            cmd = commands.train_command(form, method, run_dir, instance, launcher=self.launcher)
            runs.write_json(run_dir / runs.APP_JSON, {
                "method": method, "rank": form.rank, "learning_rate": form.learning_rate,
                "max_train_steps": form.steps, "checkpointing_steps": form.checkpoint_every,
                **commands.method_fields(form, method), "model": form.model,
                "instance_prompt": form.instance_prompt, "class_prompt": form.class_prompt, "seed": form.seed,
                "batch": batch, "methods": form.methods, "num_images": len(images) or None,
                "subject": "embedded" if embedded else "upload", "created": time.time(),
                "owner": runs.owner_record(), "command": cmd})
            self.queue.submit(Job(id=run_dir.name, run_dir=run_dir, cmd=cmd))
            names.append(run_dir.name)
        return names

    def submit_semantic(self, image_files, map_files, form: TrainForm, embedded: bool = False) -> list[str]:
        """Semantic-map runs (training/semantic_map.py), one per method, on uploaded image + map pairs
        (checked and staged by app.semantic) or the trainer's embedded set. InputError: nothing written."""
        form.model = commands.check_model(form.model)
        batch = time.strftime("%Y%m%d-%H%M%S")
        staged, pairs = None, None
        if not embedded:   # one checked copy per batch, then one per run so that a run folder stands alone
            staged = self.runs_dir / f".staging-{batch}-{os.getpid()}"
            pairs = stage_pairs(image_files, map_files, staged, self.max_image_mb)
        names = []
        try:
            for method in form.methods:
                run_dir = runs.new_run_dir(self.runs_dir, method, form.rank, stamp=batch)
                data = None
                if staged is not None:
                    data = run_dir / "seg_data"
                    shutil.copytree(staged, data)
                cmd = commands.semantic_train_command(form, method, run_dir, data, launcher=self.launcher)
                runs.write_json(run_dir / runs.APP_JSON, {
                    "task": SEMANTIC_MAP.name, "method": method, "rank": form.rank,
                    "learning_rate": form.learning_rate,
                    "max_train_steps": form.steps, "checkpointing_steps": form.checkpoint_every,
                    **commands.method_fields(form, method), "model": form.model,
                    "seed": form.seed, "batch": batch, "methods": form.methods,
                    "num_pairs": pairs, "data": "upload" if staged is not None else "embedded",
                    "created": time.time(), "owner": runs.owner_record(), "command": cmd})
                self.queue.submit(Job(id=run_dir.name, run_dir=run_dir, cmd=cmd))
                names.append(run_dir.name)
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
        return names

    def cancel(self, names) -> str:
        names = list(names or []) or [j.id for j in self.queue.active() if j.kind == "train"][:1]
        n = sum(self.queue.cancel(name) for name in reversed(names))
        return f"Cancelling {n} run(s); finished checkpoints are kept." if n else "Nothing to cancel."

    def active_train_jobs(self) -> list[str]:
        return [j.id for j in self.queue.active() if j.kind == "train"]

    def progress(self, names) -> Progress:
        infos, lines, done_steps, total_steps, all_done = [], [], 0, 0, True
        for name in names:
            try:
                ri = runs.find(self.runs_dir, name)
            except ValueError:
                continue
            infos.append(ri)
            job = self.queue.get(name)
            pos = self.queue.position(name)
            total = int(ri.total_steps or 0)
            state = job.state if job is not None else ri.status
            if job is not None and job.done:
                state = ri.status          # the files are the truth once the process has ended
            head = f"**{ri.method}** r{ri.rank} · `{ri.name}`"
            if pos is not None and pos > 0:
                all_done = False
                ahead = pos - 1 + (self.queue.current is not None)
                lines.append(f"- {head}: waiting, position {pos} in the queue ({ahead} job(s) ahead)")
            elif state in ("running", "queued"):
                all_done = False
                loss = f", loss {ri.loss:.4f}" if isinstance(ri.loss, float) else ""
                lines.append(f"- {head}: {'running' if pos == 0 else state}, step {ri.step}/{total or '?'}{loss}")
            else:
                extra = f" ({ri.detail})" if ri.detail else ""
                ck = f", checkpoints at steps {', '.join(map(str, ri.checkpoints))}" if ri.checkpoints else ""
                lines.append(f"- {head}: **{state}**{extra}{ck}")
                if state == "failed" and ri.log_tail:
                    lines.append("\n  ```\n" + "\n".join("  " + l for l in ri.log_tail[-8:]) + "\n  ```")
            total_steps += total
            done_steps += total if state in ("finished", "failed", "cancelled") else min(ri.step, total or ri.step)
        frac = done_steps / total_steps if total_steps else (1.0 if all_done else 0.0)
        if all_done and infos:
            lines.insert(0, "**All runs done.** Compare them in the Compare tab.")
        elif not infos:
            lines = ["No training running. Upload images, pick methods and press Start."]
        return Progress(done=all_done, fraction=frac, lines=lines, runs=infos)

    def follow(self, names, poll_s: float = 1.0, timeout_s: float | None = None):
        """Yield Progress every poll_s until every named run is done (then once more)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            p = self.progress(names)
            yield p
            if p.done or (deadline is not None and time.monotonic() > deadline):
                return
            time.sleep(poll_s)

    # ----- scoring --------------------------------------------------------------------------------
    def score(self, names, rescore: bool = False, protocol: str | None = None) -> str:
        """Queue eval/subject.py for the chosen runs that have checkpoints and no eval.jsonl, and for the moving
        average of those trained with --ema_decay (`--average`, RUN/ema/eval.jsonl)."""
        extra = commands.PROTOCOLS.get(protocol or "", []) + self.eval_args
        if not names:
            return "Choose runs to score."
        if not commands.module_available(self.scorer):
            return "Scoring is not available: eval/subject.py is missing from this checkout."
        queued, skipped = [], []
        for ri in self.run_infos(names):
            if ri.status in ("queued", "running"):
                skipped.append(f"{ri.name} (still training)")
                continue
            if not ri.checkpoints and not ri.has_final:
                skipped.append(f"{ri.name} (no checkpoints)")
                continue
            todo = [(kind, job) for kind, job in SCORINGS.items()
                    if job.applies(ri.path) and (rescore or not job.done(ri.path))]
            if not todo:
                skipped.append(f"{ri.name} (already scored)")
            for kind, job in todo:
                label = f"{ri.name}{job.label}"
                try:
                    self.queue.submit(Job(id=f"{kind}:{ri.name}", run_dir=ri.path, kind="eval", track=False,
                                          log_name=job.log,
                                          cmd=commands.eval_command(ri.path, self.scorer, extra + list(job.flags))))
                    queued.append(label)
                except ValueError:
                    skipped.append(f"{label} (already being scored)")
        msg = f"Scoring {len(queued)} run(s): {', '.join(queued)}." if queued else "Nothing to score."
        return msg + (f" Skipped: {', '.join(skipped)}." if skipped else "")

    def score_status(self, names) -> str:
        lines = []
        for name in names or []:
            for kind, scoring in SCORINGS.items():
                job = self.queue.get(f"{kind}:{name}")
                if job is None:
                    continue
                label = f"{name}{scoring.label}"
                if job.state == "failed":
                    tail = runs.last_log_lines(job.run_dir, 6, scoring.log)
                    lines.append(f"- `{label}`: scoring failed ({job.note})\n  ```\n" + "\n".join(tail) + "\n  ```")
                else:
                    pos = self.queue.position(job.id)
                    where = f", position {pos} in the queue" if pos else ""
                    lines.append(f"- `{label}`: scoring {job.state}{where}")
        return "\n".join(lines)

    def report(self, names) -> tuple[str, Path | None]:
        """Queue eval/report.py over the chosen runs into RUNS/_reports/<time>/; (message, folder)."""
        infos = [r for r in self.run_infos(names) if r.status not in ("queued", "running")]
        if not infos:
            return "Choose finished runs for the report.", None
        if not commands.module_available(self.reporter):
            return "Reports are not available: eval/report.py is missing from this checkout.", None
        out = self.runs_dir / "_reports" / time.strftime("%Y%m%d-%H%M%S")
        k = 1
        while out.exists():
            out = out.with_name(f"{out.name.split('~')[0]}~{k}")
            k += 1
        out.mkdir(parents=True)
        self.queue.submit(Job(id=f"report:{out.name}", run_dir=out, kind="report", track=False,
                              log_name=runs.REPORT_LOG,
                              cmd=commands.report_command([r.path for r in infos], out, self.reporter)))
        return f"Building a report of {len(infos)} run(s) in {out}.", out

    def report_result(self, out: Path) -> tuple[str, list[str]]:
        """(markdown to show, files to offer) once the report job is done."""
        job = self.queue.get(f"report:{out.name}")
        if job is not None and not job.done:
            pos = self.queue.position(job.id)
            return (f"Report {'running' if pos == 0 else f'waiting, position {pos} in the queue'}…", [])
        files = sorted(str(p) for p in out.rglob("*") if p.is_file() and p.name != runs.REPORT_LOG)
        if job is not None and job.state != "finished":
            tail = "\n".join(runs.last_log_lines(out, 8, runs.REPORT_LOG))
            return f"Report failed ({job.note}):\n```\n{tail}\n```", files
        md = next((p for p in sorted(out.glob("*.md"))), None)
        text = md.read_text(errors="replace") if md else "Report written."
        # its figures are shown in the gallery next to it: relative image links cannot render here
        text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("!["))
        return text, files

    # ----- comparison -----------------------------------------------------------------------------
    def compare(self, names, distance: str | None = None):
        infos = self.run_infos(names)
        key = compare.distance_key(infos, distance)
        details = [f"- `{r.name}` **{r.status}**: {r.detail}" + (
            "\n  ```\n" + "\n".join("  " + l for l in r.log_tail[-8:]) + "\n  ```" if r.log_tail else "")
            for r in infos if r.status in ("failed", "cancelled", "incomplete")]
        return {"grid": compare.sample_grid(infos), "gallery": compare.gallery_items(infos), "infos": infos,
                "distance": compare.curves(infos, key), "distance_key": key, "loss": compare.loss_curves(infos),
                "table": compare.metrics_table(infos), "prompt": compare.prompt_of(infos),
                "details": "\n".join(details)}

    # ----- generation ---------------------------------------------------------------------------
    # a name that is no run raises ValueError (app.runs.run_path), bad input InputError
    def checkpoints(self, name) -> tuple[list[str], str | None]:
        """(the run's checkpoint choices, the instance prompt it was trained with, if the app started it)."""
        run_dir = runs.run_path(self.runs_dir, name)
        app_json = runs.read_json(run_dir / runs.APP_JSON, {}) or {}
        return checkpoint_choices(run_dir), app_json.get("instance_prompt")

    def generate_images(self, name, checkpoint: str, prompt: str, seed: int, num_images: int, steps: int,
                        guidance: float, merged: bool) -> list:
        return self.generator.generate(runs.run_path(self.runs_dir, name), checkpoint, prompt, seed, num_images,
                                       steps, guidance, merged)

    def export_adapter(self, name, checkpoint: str, label: str) -> Path:
        return export(runs.run_path(self.runs_dir, name), checkpoint, label)

    def close(self) -> None:
        self.queue.shutdown()
