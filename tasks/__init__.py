"""Prefect tasks: one per pipeline step, each a thin wrapper around one ``tdm.stages`` function.

The stage functions (``prepare``, ``init_tree``, ``train``, ``export_embeddings``,
``relearn_tree``, ``evaluate``) already read and write every artefact; the tasks that wrap them
for Prefect, with MLflow logging and Great Expectations validation, are not written yet (issue
"MLOps around the core"). Until then, run the steps through the ``tdm`` CLI.
"""
