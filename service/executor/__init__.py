"""One executor per device, fed by several front-end processes (``IGCV2_WORKERS`` > 1).

One Python process is one GIL: HTTP, multipart, decoding and the inference thread's own Python take
turns on it, which leaves a GPU mostly idle. Copies of the whole service side by side each batched
their own trickle (a mean of 1.1-2.0 images on an H200 with 8 of them) and time-sliced the GPU. So:

* N front-ends (service/workers.py starts them on one shared port) do HTTP, auth, limits and decoding;
* one executor (:mod:`.server`) owns the models (one compiled copy), one bounded queue per version, the
  batcher and the inference threads, as a single process does;
* pixels cross once: a front-end decodes straight into its arena (:mod:`.shared`, a memfd the executor
  maps), and a request's frame on the executor's socket (:mod:`.wire`) says where its images lie;
* the queue bound is one for all: a shared ledger counts queued images and the room each front-end
  holds for requests it is reading or decoding, so a request admitted before decoding is never refused
  after it, and no front-end can overfill the queue;
* deadlines, withdrawals of clients who left, statistics and metrics come from the executor.

The front-ends reach it through the same :class:`service.catalog.Catalog` the routes use in a single
process (:mod:`.remote`), so no route knows which side of the boundary it is on. This package's front-end
half imports no torch.
"""
