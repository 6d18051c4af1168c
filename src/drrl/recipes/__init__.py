"""The end-to-end jobs the CLI runs (demo, classify, compress, prune): each loads data and models, runs the
library, times and reports. Recipes may print and draw; nothing in the library imports a recipe."""
