"""Run a list of requests through any backend: streamed to a server, batched by frame
size for a local model."""

from __future__ import annotations

from grounding.backends.base import Backend, Generation, Request


def run_requests(backend: Backend, requests: list[Request],
                 batch_size: int | None = None) -> list[Generation | Exception]:
    """One output per request, in order. A backend that streams (a server) gets them all as
    one stream; otherwise they go to ``generate`` in batches of ``batch_size``, grouped by
    model-frame size so a batch pads little. A request whose image has no model frame is
    its own error, never sent."""
    if not requests:
        return []
    stream = getattr(backend, "stream", None)
    if stream is not None:
        return list(stream(iter(requests)))
    size = max(1, batch_size or getattr(backend, "preferred_batch", 8))
    out: list[Generation | Exception | None] = [None] * len(requests)
    frames = {}
    for i, request in enumerate(requests):
        try:  # an image the model cannot take (aspect ratio over 200): its own error
            frames[i] = backend.frame(request.image.size)
        except Exception as exc:
            out[i] = exc
    order = sorted(frames, key=frames.__getitem__)
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        for i, generation in zip(chunk, backend.generate([requests[i] for i in chunk]),
                                 strict=True):
            out[i] = generation
    return out  # type: ignore[return-value]
