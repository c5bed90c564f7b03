"""Checkpoint conversions and model preparation. Stands alone: imports neither server nor shadow."""
