"""From images and a query to results: prompts, the Detector, prefetching, verification,
questions about detections, overlays."""
