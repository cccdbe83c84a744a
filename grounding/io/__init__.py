"""Reading inputs and writing records: images as a person sees them, JSON-lines files."""
