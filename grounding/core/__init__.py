"""The pure core: errors, dialects, coordinate geometry, classes, confidence, and the
result record every later step reads. Imports nothing from the layers above."""
