"""Prefect flows that compose the tasks of ``tasks/`` into the alternating TDM rounds.

- ``flows.pipeline.tdm_pipeline``: validate raw -> prepare -> init tree -> validate prepared ->
  [train -> evaluate -> export -> relearn]* with one MLflow parent run and one nested run per
  round, and a Prefect markdown artifact of the metrics.
  ``python -m flows.pipeline --set key=value`` runs it.
"""
