"""Prefect flows that compose the tasks of ``tasks/`` into the alternating TDM rounds.

Not written yet (issue "MLOps around the core"); ``tdm pipeline`` runs the same rounds today.
"""
