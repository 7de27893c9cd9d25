"""lowband.wan (see DESIGN.md)."""
