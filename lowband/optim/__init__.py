"""lowband.optim (see DESIGN.md)."""
