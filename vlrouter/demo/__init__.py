"""Demo material: synthetic GUI screenshots and datasets for the four example tasks."""
