"""The per-class recall table of a selection study, against a hand computation."""

import pandas as pd

from medssl_monai.reporting.markdown import per_class_recall_table


def test_per_class_recall_table_is_the_mean_over_seeds_at_the_budget():
    rows = [  # arm, fraction, seed, recall_df, recall_nv
        ("random:typiclust", 0.05, 0, 0.0, 0.9), ("random:typiclust", 0.05, 1, 0.5, 0.7),
        ("random:typiclust", 0.05, 2, 1.0, 0.8), ("random:random", 0.05, 0, 0.25, 1.0),
        ("random:random", 0.10, 0, 0.99, 0.99),  # another budget: not in the 5% table
    ]
    df = pd.DataFrame(rows, columns=["arm", "fraction", "seed", "recall_df", "recall_nv"])
    lines = per_class_recall_table(df, 0.05).splitlines()
    assert lines[0] == "| arm | df | nv | seeds |"
    by_arm = {ln.split(" | ")[0].lstrip("| "): ln for ln in lines[2:]}
    assert set(by_arm) == {"random:typiclust", "random:random"}
    assert by_arm["random:typiclust"] == f"| random:typiclust | {0.5:.2f} | {(0.9 + 0.7 + 0.8) / 3:.2f} | 3 |"
    assert by_arm["random:random"] == "| random:random | 0.25 | 1.00 | 1 |"
    assert per_class_recall_table(df, 0.2) == "_none_\n"
    assert per_class_recall_table(df.drop(columns=["recall_df", "recall_nv"]), 0.05) == "_none_\n"
