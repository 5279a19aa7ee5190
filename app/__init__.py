"""lowrank's Gradio app: upload a subject, train adapters with live progress, compare methods across
checkpoints, generate from any checkpoint. `python -m app` or `lowrank-app`.

    runs.py      run registry on disk (status, dead-process detection, logs, metrics)
    jobs.py      one-at-a-time subprocess queue (log capture, cancel: SIGTERM then SIGKILL)
    inputs.py    upload and form checks, file-name sanitising
    commands.py  the trainer / scorer command lines, base-model check
    compare.py   sample grid, curves, metrics table
    generate.py  seeded generation from a checkpoint (optionally merged)
    service.py   the logic behind the UI;  ui.py  the Gradio Blocks;  __main__.py  the CLI
"""
