"""lowrank's Gradio app, four tabs: Train (upload a subject or semantic maps, train adapters with live
progress), Compare (methods across checkpoints: samples, curves, scores, reports), Generate (from any
checkpoint; export its adapter) and Robustness (the eval.robustness reports). `python -m app` or `lowrank-app`.

  the page   ui.py (assembles the tabs), tab_train.py, tab_compare.py, tab_generate.py, tab_robustness.py (one
             tab each: its components and handlers), widgets.py (what the tabs share)
  logic      service.py (the one way the tabs reach jobs and run folders), inputs.py (upload and form checks),
             semantic.py (image + label-map uploads), commands.py (trainer / scorer command lines),
             compare.py + lineplot.py (grid, curves, table, figures), generate.py (seeded generation, export),
             robustness.py (report folders)
  storage    runs.py (run registry on disk), jobs.py (one-at-a-time subprocess queue), cache.py (what is kept
             between clicks)
  serving    __main__.py (the CLI), auth.py (logins)
Imports point one way: app -> training -> lowrank (eval/ runs as a subprocess); inside app, the tabs -> service and
the logic -> storage. No module is imported inside a function (tests/test_house.py holds the code to it).
"""
