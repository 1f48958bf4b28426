"""The base of every error that is the input's or the environment's fault, never a bug.

Bad params (``tdm.config.ConfigError``), bad data (``tdm.data.schema.DataError``), a tree, model
or checkpoint file that does not load (``TreeFormatError``, ``IntegrityError``,
``CheckpointError``), a root in use (``LockedError``) and a request that cannot be answered
(``RequestError``) all derive from ``TdmError``. The doors (the ``tdm`` command, the Prefect
flows) show these as one line; anything else is a bug and keeps its traceback.
"""


class TdmError(Exception):
    """An error whose message alone tells the user what to fix."""
