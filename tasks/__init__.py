"""Prefect tasks: one per pipeline step, each a thin wrapper around one ``tdm.stages`` function.

- ``tasks.steps``: ``prepare_task`` (retried: I/O), ``init_tree_task``, ``train_task`` (the GPU
  step; per-epoch ``loss``/``valid_recall`` to MLflow), ``evaluate_task``, ``export_task``,
  ``relearn_task``, ``config_task``, and the Great Expectations gates ``validate_raw_task`` and
  ``validate_prepared_task`` (no retry: a failing validation stops the flow). They write the
  same artefacts at the same paths (``tdm.paths.Paths``) as the ``tdm`` CLI and ``dvc repro``.
- ``tasks.tracking``: MLflow helpers (parent and nested round runs, dotted params, metrics per
  method and filter mode, tree figures and files, git/data tags); logging goes through an explicit
  tracking URI and run id, never MLflow's thread-local active run.
- ``tasks.validation``: the expectation suites, kept as code, for the raw behaviour table and the
  prepared samples, with readable reports (which expectation, column, offending rows).
- ``tasks.plot_data``: the CSV series of ``dvc plots`` (loss per epoch, layer-wise recall, recall
  per round), written by the DVC stages ``plot_data@<r>``/``plot_summary`` and by the flow.
- ``tasks.figures``: the PNGs of a round run (loss curve, layer-wise recall, tree balance).
- ``tasks.pyfunc``: a trained model folder as an MLflow pyfunc model that loads back.
- ``tasks.versioning``: ``dvc commit`` of a flow run's outputs and the hashes dvc.lock lists.
"""
