"""Demo data: monthly birth records, generated (seeded), so nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FILES = {  # file name → (rows, seed)
    "hospital_births_feb.csv": (240, 2),
    "clinic_births_feb.csv": (180, 3),
    "clinic_births_mar.csv": (200, 4),
}


def birth_records(rows: int, seed: int) -> np.ndarray:
    """Weight (kg) and height (cm) of newborns, plausibly correlated."""
    rng = np.random.default_rng(seed)
    weight = np.clip(rng.normal(3.4, 0.5, rows), 1.5, 5.5)
    height = np.clip(50.0 + 4.0 * (weight - 3.4) + rng.normal(0, 1.5, rows), 40.0, 60.0)
    return np.round(np.stack([weight, height], axis=1), 2).astype(np.float32)


def write_demo_data(folder: Path) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    tables = {}
    for name, (rows, seed) in FILES.items():
        table = birth_records(rows, seed)
        np.savetxt(folder / name, table, delimiter=",", header="weight,height", comments="", fmt="%.2f")
        tables[name] = table
    return tables


def digits_split(nodes: int, *, skew: bool = False, seed: int = 0
                 ) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's bundled digits (1,797 8×8 images), 80/20 stratified (seed 0): the
    training part split over ``nodes`` tables of 65 columns (64 pixels, then the label) —
    IID, or with a label skew (sorted by label, so each node sees a few digits mostly) —
    and the held-out test part (x, y)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float32), digits.target, test_size=0.2, stratify=digits.target, random_state=seed)
    order = np.argsort(y_train, kind="stable") if skew else np.random.default_rng(seed).permutation(len(y_train))
    table = np.column_stack([x_train, y_train]).astype(np.float32)[order]
    return np.array_split(table, nodes), (x_test, y_test)
