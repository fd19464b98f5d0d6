"""Measure and plan: the calibration set, full-precision references and fingerprints, drift and its gates, the
compare grid, mixed-precision plans, drift repair, and the memory planner."""
