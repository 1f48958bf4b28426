import numpy as np

from tdm.data.features import eval_batch, make_history, train_batch
from tdm.data.protocol import EvalSplit, TrainSplit, training_positions

ITEMS = np.array([10, 11, 12, 13, 14, 15])
TIMES = np.array([100, 200, 300, 400, 500, 600])
BOUNDS = [100, 250]  # windows: age < 100 -> 0, [100, 250) -> 1, >= 250 -> 2


def test_make_history_hand_computed():
    hist, windows = make_history(
        ITEMS,
        TIMES,
        starts=np.array([0, 4, 0, 2]),
        ends=np.array([4, 6, 0, 3]),
        now=np.array([400, 600, 50, 300]),
        max_len=3,
        window_bounds=BOUNDS,
    )
    # row 0: items[max(0, 4-3):4] = 11, 12, 13 (truncated to the most recent 3)
    # row 1: items[4:6] = 14, 15, right-aligned, one pad
    # row 2: empty; row 3: items[2:3] = 12
    assert hist.tolist() == [[11, 12, 13], [-1, 14, 15], [-1, -1, -1], [-1, -1, 12]]
    # ages: row 0: 200, 100, 0 -> 1, 1 (an age equal to a bound is in the older window), 0
    # row 1: 100, 0 -> 1, 0; row 3: 0 -> 0
    assert windows.tolist() == [[1, 1, 0], [-1, 1, 0], [-1, -1, -1], [-1, -1, 0]]
    assert hist.dtype == np.int64 and windows.dtype == np.int64


def test_make_history_old_behaviour_in_last_window_and_empty_items():
    hist, windows = make_history(ITEMS, TIMES, [0], [2], [1000], 4, BOUNDS)
    assert hist.tolist() == [[-1, -1, 10, 11]] and windows.tolist() == [[-1, -1, 2, 2]]
    hist, windows = make_history(np.zeros(0), np.zeros(0), [0], [0], [5], 2, BOUNDS)
    assert hist.tolist() == [[-1, -1]] and windows.tolist() == [[-1, -1]]


def test_train_batch_uses_only_earlier_behaviours_of_the_same_user():
    train = TrainSplit(
        users=np.array([7, 9]), items=ITEMS, times=TIMES, offsets=np.array([0, 4, 6])
    )
    positions = training_positions(train, min_history=1)
    assert positions.tolist() == [1, 2, 3, 5]
    hist, windows, targets = train_batch(train, positions, max_len=2, window_bounds=BOUNDS)
    assert targets.tolist() == [11, 12, 13, 15]
    assert hist.tolist() == [[-1, 10], [10, 11], [11, 12], [-1, 14]]
    assert windows.tolist() == [[-1, 1], [1, 1], [1, 1], [-1, 1]]
    assert training_positions(train, 3).tolist() == [3]
    assert training_positions(train, 1, np.array([3, 0])).tolist() == [5, 1]


def test_eval_batch_measures_age_from_last_known_behaviour():
    split = EvalSplit(
        users=np.array([3, 4]),
        hist_items=np.array([1, 2, 3]),
        hist_times=np.array([0, 150, 200]),
        hist_offsets=np.array([0, 1, 3]),
        truth_items=np.array([5, 6]),
        truth_offsets=np.array([0, 1, 2]),
    )
    hist, windows = eval_batch(split, np.array([1, 0]), 3, BOUNDS)
    assert hist.tolist() == [[-1, 2, 3], [-1, -1, 1]]
    assert windows.tolist() == [[-1, 0, 0], [-1, -1, 0]]
