"""Overrides that shrink the pipeline to a few seconds, shared by the orchestration tests."""

# A tiny synthetic corpus and protocol: 300 users, 200 items.
TINY_DATA = [
    "data.source=synthetic",
    "synthetic.n_users=300",
    "synthetic.n_items=200",
    "synthetic.n_categories=12",
    "synthetic.behaviors_per_user=25",
    "data.n_test_users=40",
    "data.n_valid_users=30",
    "data.max_history=15",
]

TINY = [
    *TINY_DATA,
    "train.epochs=1",
    "train.batch_size=128",
    "train.progress=false",
    "train.num_threads=1",  # 2-core machines: torch threads fight the Prefect server
    "sampler.total_negatives=20",
    "model.hidden=[16, 8]",
    "rounds.count=2",
]
