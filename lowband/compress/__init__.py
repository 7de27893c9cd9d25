"""lowband.compress (see DESIGN.md)."""
