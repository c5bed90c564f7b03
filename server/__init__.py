"""HTTP layer and engines of shadowserve."""
