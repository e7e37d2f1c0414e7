"""torch.nn glue: storage + forward only."""
