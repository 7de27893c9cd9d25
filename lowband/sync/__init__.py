"""lowband.sync (see DESIGN.md)."""
