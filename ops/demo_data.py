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
