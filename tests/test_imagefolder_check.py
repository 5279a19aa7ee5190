"""The imagefolder check (training/common/hfdata.py): a metadata.jsonl that names a file that is not there, or one
that does not open as an image, stops a trainer in one `error:` line naming the file and its line, exit 2, before
the run folder exists (the `datasets` library would find it only when decoding that row, in a long traceback)."""
import json

import pytest
from PIL import Image

from tests.stderr import one_error_line
from training import dreambooth, semantic_map

FAST = ["--resolution", "32", "--rank", "2", "--max_train_steps", "2", "--report_to", "none", "--skip_final_samples"]

pytestmark = pytest.mark.usefixtures("tiny_cache")


def imagefolder(root, names):
    root.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "a.png")
    (root / "notes.png").write_text("not an image")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "a photo"}) + "\n"
                                                 for n in names))
    return str(root)


@pytest.mark.parametrize("listed, says", [("b.png", "'b.png', which is not there"),
                                          ("notes.png", "'notes.png', which does not open as an image")])
def test_an_imagefolder_listing_a_bad_file_stops_before_the_run_folder(tmp_path, capsys, listed, says):
    data, out = imagefolder(tmp_path / "data", ["a.png", listed]), tmp_path / "out"
    assert dreambooth.main(["--dataset_name", data, "--instance_prompt", "a photo of sks cat",
                            "--output_dir", str(out), *FAST]) == 2
    line = one_error_line(capsys)
    assert says in line and "metadata.jsonl line 2" in line and "--dataset_name" in line, line
    assert not out.exists()


def test_the_semantic_map_trainer_checks_its_dataset_folder_too(tmp_path, capsys):
    data, out = imagefolder(tmp_path / "data", ["a.png", "gone.png"]), tmp_path / "out"
    assert semantic_map.main(["--dataset_name", data, "--output_dir", str(out), *FAST]) == 2
    assert "'gone.png', which is not there" in one_error_line(capsys)
    assert not out.exists()
