"""Prefect flows that compose the tasks of ``tasks/`` into the alternating TDM rounds.

- ``flows.pipeline.tdm_pipeline``: validate raw -> prepare -> init tree -> validate prepared ->
  [train -> evaluate -> plot data -> export -> relearn]* -> dvc commit, with one MLflow parent
  run and one nested run per round (tagged with the DVC hashes of their outputs), and a Prefect
  markdown artifact of the metrics.
  ``python -m flows.pipeline --set key=value`` runs it.
"""
