"""Using what a comparison trained: predictions from a saved artifact, and exporting it (merged or not)."""
