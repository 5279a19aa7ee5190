"""ground: what every room of the house reads and nothing else, below all of them (pure standard library).

    runfolder.py   the run folder's file names, atomic writes and readers (trainers, eval, the app, the benches)
    cli.py         the one-line error contract of every command (`error: ...`, exit status 2)
    ade20k.py      ADE20K's class names and palette (the semantic-map trainer and eval.segmentation)

Not adapter code, so not in `lowrank` (which holds adapters alone); imported by lowrank, training, eval, app
and bench alike, importing nothing of the project.
"""
