"""lowband.distro (see DESIGN.md)."""
