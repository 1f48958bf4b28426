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


# ------------------------------------------------------------------ data.window_mode (issue 14)
def test_make_history_last_behaviour_measures_from_the_rows_own_last_behaviour():
    # same rows as the hand-computed test above; `now` no longer matters
    hist, windows = make_history(
        ITEMS,
        TIMES,
        starts=np.array([0, 4, 0, 2]),
        ends=np.array([4, 6, 0, 3]),
        now=np.array([10_000, 10_000, 10_000, 10_000]),
        max_len=3,
        window_bounds=BOUNDS,
        window_mode="last_behaviour",
    )
    assert hist.tolist() == [[11, 12, 13], [-1, 14, 15], [-1, -1, -1], [-1, -1, 12]]
    # row 0: last is 13 at 400 -> ages 200, 100, 0; row 1: 100, 0; row 3: 0
    assert windows.tolist() == [[1, 1, 0], [-1, 1, 0], [-1, -1, -1], [-1, -1, 0]]


def test_make_history_position_windows_are_ranks_from_the_most_recent():
    hist, windows = make_history(
        ITEMS, TIMES, [0, 0], [6, 2], [0, 0], 4, [1, 3], window_mode="position"
    )
    assert hist.tolist() == [[12, 13, 14, 15], [-1, -1, 10, 11]]
    # positions 3, 2, 1, 0 -> windows 2 (>= 3), 1, 1, 0 (< 1)
    assert windows.tolist() == [[2, 1, 1, 0], [-1, -1, 1, 0]]


def test_position_mode_gives_the_public_codes_fixed_split_of_69():
    from tdm.data.protocol import position_window_bounds

    bounds = position_window_bounds(69, 10)
    assert bounds == [1, 2, 3, 5, 7, 9, 19, 29, 49]
    n = 100  # a long history: only the last 69 are seen
    hist, windows = make_history(
        np.arange(n), np.zeros(n), [0], [n], [0], 69, bounds, window_mode="position"
    )
    assert hist[0, 0] == n - 69 and hist[0, -1] == n - 1
    sizes = np.bincount(windows[0], minlength=10)  # window 0 = the most recent behaviour
    assert sizes[::-1].tolist() == [20, 20, 10, 10, 2, 2, 2, 1, 1, 1]  # oldest group first


def test_position_window_bounds_generalise_to_other_sizes():
    from tdm.data.protocol import position_window_bounds

    assert position_window_bounds(69, 1) == []
    assert position_window_bounds(20, 4) == [1, 2, 7]  # 20 * F(k/4): 0.72, 2.03, 6.96
    assert position_window_bounds(138, 10) == [2, 4, 6, 10, 14, 18, 38, 58, 98]  # scales with L
    for length, n_windows in [(5, 10), (15, 3), (200, 7), (69, 20)]:
        bounds = position_window_bounds(length, n_windows)
        assert len(bounds) == n_windows - 1 and bounds[0] >= 1
        assert all(b < c for b, c in zip(bounds, bounds[1:], strict=False))
        if n_windows <= length:  # every window holds at least one of the positions 0..L-1
            assert bounds[-1] <= length - 1


def test_train_batch_last_behaviour_puts_the_latest_in_window_0_target_time_does_not():
    train = TrainSplit(
        users=np.array([7, 9]), items=ITEMS, times=TIMES, offsets=np.array([0, 4, 6])
    )
    positions = training_positions(train, min_history=1)
    _, target, _ = train_batch(train, positions, max_len=2, window_bounds=BOUNDS)
    _, last, _ = train_batch(
        train, positions, max_len=2, window_bounds=BOUNDS, window_mode="last_behaviour"
    )
    assert target[:, -1].tolist() == [1, 1, 1, 1]  # 100 s before the target: window 1
    assert last.tolist() == [[-1, 0], [1, 0], [1, 0], [-1, 0]]


def test_eval_batch_follows_the_mode():
    split = EvalSplit(
        users=np.array([3]),
        hist_items=np.array([1, 2, 3]),
        hist_times=np.array([0, 150, 200]),
        hist_offsets=np.array([0, 3]),
        truth_items=np.array([5]),
        truth_offsets=np.array([0, 1]),
    )
    for mode in ("target_time", "last_behaviour"):  # both measure from the last known one
        assert eval_batch(split, np.array([0]), 3, BOUNDS, mode)[1].tolist() == [[1, 0, 0]]
    assert eval_batch(split, np.array([0]), 3, [1, 2], "position")[1].tolist() == [[2, 1, 0]]
