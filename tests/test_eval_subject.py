"""eval.subject: DINO / CLIP-I / CLIP-T against the cosine arithmetic done here on tiny random models
loaded by path, the embedding cache, the DreamBooth prompt lists, checkpoint choice, a trained run end
to end (tiny SD + lowrank adapters) and one-line errors on bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval import EvalError, subject
from eval.common import run_main
from eval.embed import ClipEmbedder, DinoEmbedder
from eval.prompts import LIVE_PROMPTS, OBJECT_PROMPTS, protocol_prompts, subject_of

from .test_eval_support import one_thread, random_image, tiny_models, write_generated, write_real  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of sks cat", "a sks cat in the snow"]


def reference_scores(models: dict, real: list[Path], generated: Path, skip: tuple = ()) -> dict:
    """The metrics computed here, independently: plain forward passes and cosine_similarity."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel

    rows = [json.loads(line) for line in (generated / "prompts.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["image"] not in skip]
    gen = [Image.open(generated / r["image"]).convert("RGB") for r in rows]
    reals = [Image.open(p).convert("RGB") for p in real]
    with torch.no_grad():
        vit = ViTModel.from_pretrained(models["dino"], add_pooling_layer=False)
        vproc = AutoImageProcessor.from_pretrained(models["dino"])
        cls = lambda imgs: vit(**vproc(images=imgs, return_tensors="pt")).last_hidden_state[:, 0]  # noqa: E731
        clip = CLIPModel.from_pretrained(models["clip"])
        cproc, tok = AutoImageProcessor.from_pretrained(models["clip"]), AutoTokenizer.from_pretrained(models["clip"])
        cimg = lambda imgs: clip.get_image_features(  # noqa: E731
            **cproc(images=imgs, return_tensors="pt")).pooler_output
        ctxt = clip.get_text_features(
            **tok([r["prompt"] for r in rows], padding=True, return_tensors="pt")).pooler_output
        d_gen, d_real, c_gen, c_real = cls(gen), cls(reals), cimg(gen), cimg(reals)
    dino = [[F.cosine_similarity(g, r, dim=0).item() for r in d_real] for g in d_gen]
    clip_i = [[F.cosine_similarity(g, r, dim=0).item() for r in c_real] for g in c_gen]
    clip_t = [F.cosine_similarity(g, t, dim=0).item() for g, t in zip(c_gen, ctxt)]
    return {"dino": np.mean(dino), "clip_i": np.mean(clip_i), "clip_t": np.mean(clip_t),
            "rows": rows, "dino_pairs": dino, "clip_i_pairs": clip_i, "clip_t_each": clip_t}


@pytest.fixture
def folders(tmp_path):
    real = write_real(tmp_path / "real", n=3)
    write_generated(tmp_path / "gen", PROMPTS, per_prompt=2)
    return tmp_path / "real", real, tmp_path / "gen"


def score_cli(models, *extra) -> list[str]:
    return ["--dino_model", str(models["dino"]), "--clip_model", str(models["clip"]), "--device", "cpu", *extra]


def test_scores_are_the_mean_cosines_over_every_pair(tiny_models, folders, tmp_path):
    real_dir, real, gen = folders
    out = tmp_path / "scores.json"
    assert run_main(subject.main, score_cli(tiny_models, "--real_dir", str(real_dir), "--generated_dir", str(gen),
                                  "--output", str(out), "--batch_size", "2")) == 0
    got, ref = json.loads(out.read_text()), reference_scores(tiny_models, real, gen)
    assert (got["n_real"], got["n_generated"], got["n_skipped"]) == (3, 4, 0)
    for key in ("dino", "clip_i", "clip_t"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    # the random models give distinct cosines, so a wrong pairing or average would show
    assert np.std(ref["dino_pairs"]) > 1e-4 and np.std(ref["clip_t_each"]) > 1e-4
    assert [r["prompt"] for r in got["prompts"]] == PROMPTS
    for i, row in enumerate(got["prompts"]):   # per-prompt rows: the same arithmetic on that prompt's images
        idx = [k for k, r in enumerate(ref["rows"]) if r["prompt"] == row["prompt"]]
        assert row["n_generated"] == len(idx) == 2
        assert row["dino"] == pytest.approx(np.mean([ref["dino_pairs"][k] for k in idx]), abs=1e-6)
        assert row["clip_i"] == pytest.approx(np.mean([ref["clip_i_pairs"][k] for k in idx]), abs=1e-6)
        assert row["clip_t"] == pytest.approx(np.mean([ref["clip_t_each"][k] for k in idx]), abs=1e-6)


def test_embeddings_are_computed_once_per_image_and_model(tiny_models):
    dino = DinoEmbedder(str(tiny_models["dino"]), batch_size=8)
    calls = []
    forward = dino.model.forward
    dino.model.forward = lambda **kw: calls.append(kw["pixel_values"].shape[0]) or forward(**kw)
    a, b = random_image(1), random_image(2)
    first = dino.images([a, b, a.copy()])          # the copy has the same content: embedded once
    again = dino.images([b, a])
    assert calls == [2]
    assert torch.equal(again, first[[1, 0]]) and torch.allclose(first.norm(dim=1), torch.ones(3, dtype=torch.float64))
    clip = ClipEmbedder(str(tiny_models["clip"]))
    texts = clip.texts(["a red cat", "a blue dog", "a red cat"])
    assert torch.equal(texts[0], texts[2]) and not torch.allclose(texts[0], texts[1])
    assert len(clip.text_cache) == 2


def test_unreadable_images_are_named_skipped_and_counted(tiny_models, folders, tmp_path, capsys):
    real_dir, real, gen = folders
    (real_dir / "broken.png").write_bytes(b"not a png")
    (real_dir / "cat.heic").write_bytes(b"\0" * 16)                            # a format we do not read
    Image.new("RGB", (8, 8)).save(gen / "trunc.png")
    (gen / "trunc.png").write_bytes((gen / "trunc.png").read_bytes()[:20])   # truncated mid-file
    with open(gen / "prompts.jsonl", "a") as f:
        f.write(json.dumps({"image": "trunc.png", "prompt": "a red cat"}) + "\n")
    out = tmp_path / "s.json"
    assert run_main(subject.main, score_cli(tiny_models, "--real_dir", str(real_dir), "--generated_dir", str(gen),
                                  "--output", str(out))) == 0
    got = json.loads(out.read_text())
    assert (got["n_real"], got["n_generated"], got["n_skipped"]) == (3, 4, 3)
    assert all(any(name in s for s in got["skipped"]) for name in ("broken.png", "trunc.png", "cat.heic"))
    err = capsys.readouterr().err
    assert "warning:" in err and "broken.png" in err and "trunc.png" in err and "cat.heic" in err
    expected = reference_scores(tiny_models, real, gen, skip=("trunc.png",))["dino"]
    assert got["dino"] == pytest.approx(expected, abs=1e-6)


def test_prompt_lists_are_dreambooths():
    assert len(OBJECT_PROMPTS) == len(LIVE_PROMPTS) == 25
    assert len(set(OBJECT_PROMPTS)) == len(set(LIVE_PROMPTS)) == 25
    assert all(p.count("{0} {1}") == 1 for p in OBJECT_PROMPTS + LIVE_PROMPTS)
    # the first 10 and last 5 are shared; the middle 10 are accessories (live) vs backgrounds (object)
    assert OBJECT_PROMPTS[:10] == LIVE_PROMPTS[:10] and OBJECT_PROMPTS[20:] == LIVE_PROMPTS[20:]
    assert "a {0} {1} wearing a santa hat" in LIVE_PROMPTS
    assert "a {0} {1} floating in an ocean of milk" in OBJECT_PROMPTS
    dog = protocol_prompts("sks", "dog")
    assert dog[13] == "a sks dog wearing a black top hat and a monocle"
    assert protocol_prompts("qwe", "backpack")[14] == "a qwe backpack floating in an ocean of milk"
    assert protocol_prompts("qwe", "dog", kind="object")[14] == "a qwe dog floating in an ocean of milk"
    assert subject_of("a photo of sks dog") == ("sks", "dog")
    assert subject_of("a photo of zwx stuffed animal", "a photo of stuffed animal") == ("zwx", "stuffed animal")
    with pytest.raises(EvalError):
        subject_of("dog")


def fake_run(root: Path, steps=(2, 4), final: int | None = 6) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"args": {"instance_prompt": "a photo of sks cat"}}))
    for s in steps:
        (run / f"checkpoint-{s}").mkdir()
        for f in ("adapter_config.json", "adapter.safetensors", "trainer_state.json"):
            (run / f"checkpoint-{s}" / f).write_text("{}")
    if final is not None:
        for f in ("adapter_config.json", "adapter.safetensors"):
            (run / f).write_text("{}")
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n"
                                                   for s in range(1, final + 1)))
    return run


def test_checkpoint_choice(tmp_path):
    run = fake_run(tmp_path)
    info = json.loads((run / "run.json").read_text())
    steps = lambda which: [s for s, _ in subject.choose_checkpoints(run, info, which)]  # noqa: E731
    assert steps("all") == [2, 4, 6] and steps("last") == [6] and steps("2,6") == [2, 6]
    assert subject.choose_checkpoints(run, info, "last")[0][1] == run        # the final adapter
    with pytest.raises(EvalError, match="has 2, 4, 6"):
        steps("3")
    with pytest.raises(EvalError, match="all, last"):
        steps("latest")


@pytest.mark.parametrize("case", ["missing_dir", "empty_dir", "missing_file", "bad_line", "no_prompts",
                                  "not_a_model", "offline_hub", "both_modes", "no_adapter", "output_is_a_folder"])
def test_bad_input_is_one_error_line_and_no_output(case, tiny_models, folders, tmp_path, capsys):
    real_dir, _, gen = folders
    out = tmp_path / "out.json"
    out.write_text("previous")
    args = {"real_dir": real_dir, "generated_dir": gen, "dino_model": tiny_models["dino"]}
    if case == "missing_dir":
        args["real_dir"] = tmp_path / "nope"
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        args["real_dir"] = tmp_path / "empty"
    elif case == "missing_file":
        with open(gen / "prompts.jsonl", "a") as f:
            f.write(json.dumps({"image": "gone.png", "prompt": "x"}) + "\n")
    elif case == "bad_line":
        with open(gen / "prompts.jsonl", "a") as f:
            f.write("{not json\n")
    elif case == "no_prompts":
        (gen / "prompts.jsonl").unlink()
    elif case == "not_a_model":
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "config.json").write_text("{}")
        args["dino_model"] = tmp_path / "junk"
    elif case == "offline_hub":
        args["dino_model"] = "nobody/no-such-model-for-eval-tests"
    argv = ["--dino_model", str(args["dino_model"]), "--clip_model", str(tiny_models["clip"]),
            "--real_dir", str(args["real_dir"]), "--generated_dir", str(args["generated_dir"]), "--output", str(out)]
    if case == "both_modes":
        argv += ["--run_dir", str(tmp_path)]
    if case == "no_adapter":
        run = fake_run(tmp_path, steps=(), final=None)
        argv = argv[:4] + ["--run_dir", str(run), "--output", str(out)]
    if case == "output_is_a_folder":
        argv[-1] = str(tmp_path)
    assert run_main(subject.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    expected = {"missing_dir": "does not exist", "empty_dir": "has no images", "missing_file": "gone.png",
                "bad_line": "line 5", "no_prompts": "no prompts.jsonl", "not_a_model": "not a transformers model",
                "offline_hub": "offline", "both_modes": "not both", "no_adapter": "no adapter",
                "output_is_a_folder": "it is a folder"}[case]
    assert expected in err[0]
    assert out.read_text() == "previous"                  # never a half-written (or clobbered) output
    assert [p.name for p in tmp_path.glob(".out.json*")] == []


def test_cli_exit_status_and_stderr(tmp_path):
    """The real `python -m eval.subject`: exit 2 and one line, no traceback (subprocess, as the app runs it)."""
    proc = subprocess.run([sys.executable, "-m", "eval.subject", "--real_dir", str(tmp_path / "missing"),
                           "--generated_dir", str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr or "offline" in proc.stderr


@pytest.mark.parametrize("module,argv,expected", [
    ("subject", ["--bogus"], "unrecognized arguments: --bogus"),
    ("subject", ["--real_dir", "r", "--generated_dir", "g", "--batch_size", "x"], "--batch_size"),
    ("segmentation", ["--generated_dir", "g"], "--label_dir"),
    ("report", ["--out", "o"], "RUN_DIR"),
])
def test_flag_errors_are_one_line(module, argv, expected, capsys):
    """argparse's mistakes (unknown, missing, mistyped flags) read like every other bad input: one line."""
    import importlib


    mod = importlib.import_module(f"eval.{module}")
    assert run_main(mod.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0] and "--help" in err[0]
