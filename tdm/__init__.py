"""tdm: Tree-based Deep Model for large-corpus recommendation (Zhu et al., KDD 2018)."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Recommender", "__version__"]


def __getattr__(name: str):
    if name == "Recommender":  # lazy: importing tdm must not pull torch in
        from tdm.recommender import Recommender

        return Recommender
    raise AttributeError(f"module 'tdm' has no attribute {name!r}")
