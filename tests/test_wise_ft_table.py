"""bench/wise_ft.py's table: each cell's margin is taken to the same seed's better fine-tuned baseline (alpha 1),
per data set, so a seed where the baselines are strong does not flatter another seed's model."""


def test_margins_against_the_same_seeds_better_baseline(load_bench):
    wf = load_bench("wise_ft")
    results = {
        "s0": {"dense_ft": {"0.5": {"new": 60.0, "old": 50.0}, "1": {"new": 64.0, "old": 40.0}},
               "upcycle": {"0.5": {"new": 61.0, "old": 49.0}, "1": {"new": 66.0, "old": 41.0}},
               "dmu": {"0.5": {"new": 55.0, "old": 52.0}, "1": {"new": 58.0, "old": 45.0}}},
        "s1": {"dense_ft": {"0.5": {"new": 50.0, "old": 50.0}, "1": {"new": 70.0, "old": 35.0}},
               "upcycle": {"0.5": {"new": 51.0, "old": 49.0}, "1": {"new": 60.0, "old": 39.0}},
               "dmu": {"0.5": {"new": 57.0, "old": 50.0}, "1": {"new": 62.0, "old": 43.0}}},
    }
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in wf.table(results).splitlines() if line.startswith("| ") and "alpha |" not in line}
    # dmu at alpha 1: new 58 - 66 = -8 (s0), 62 - 70 = -8 (s1); old 45 - 41 = +4, 43 - 39 = +4
    assert rows[("dmu", "1")] == ["60.0 ± 2.8", "-8.0 ± 0.0", "44.0 ± 1.4", "+4.0 ± 0.0"]
    # dense_ft at 0.5, old: 50 - 41 = +9 (s0), 50 - 39 = +11 (s1)
    assert rows[("dense_ft", "0.5")][3] == "+10.0 ± 1.4"
