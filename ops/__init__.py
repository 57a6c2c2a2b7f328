"""Operations: the gridq CLI, the embedded local grid, demo configs and data, benchmarks."""
