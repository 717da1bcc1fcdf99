"""The commands' work, without click: one module per command, as pip keeps its commands.

Each ``run_*`` function takes plain values, runs the steps (prepare, apply, evaluate,
export, verify, report) through :class:`~fairdeploy.Experiment` and returns a typed
result; ``cli.py`` only parses arguments and prints. Modules:

- :mod:`.optimize`: ``optimize --dry-run`` (:func:`dry_run`) and ``optimize``
  (:func:`run_optimize`);
- :mod:`.compare`: ``compare`` (:func:`run_compare`) and its row exporter;
- :mod:`.sweep`: ``optimize --grid/--select`` (:func:`run_sweep`, :func:`chosen_recipe`);
- :mod:`.train`: ``train`` (:func:`run_train`) and ``demo`` (:func:`run_demo`);
- :mod:`.verify`: references from checkpoints for ``verify``, ``predict`` and ``bench``;
- shared: :mod:`._common` (run names, paths, warnings as notes), :mod:`._rows` (evaluating
  plans into rows), :mod:`._deploy` (export, int8, verification, latency).

This package imports nothing itself, so ``fairdeploy --help`` stays light; import the
command module you need.
"""
