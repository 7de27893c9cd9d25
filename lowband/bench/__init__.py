"""lowband.bench (see DESIGN.md)."""
