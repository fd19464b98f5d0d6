"""HTTP serving (empty until the serving issue fills it)."""
