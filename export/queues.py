"""How long requests may wait, and how many: the dynamic batching and bounded queues of every served model.

Overload: every model's queue is bounded, in requests (Triton counts requests,
not images), and a request that waited longer than its model's timeout is
refused with UNAVAILABLE instead of piling up; the client retries it with
backoff. Each queued request holds its tensors: up to max_batch_size images.
"""

# Dynamic batching: how long a request may wait for others to fill a batch.
GPU_QUEUE_DELAY_US = 2000
CPU_QUEUE_DELAY_US = 0
POSTPROCESS_QUEUE_DELAY_US = 500

GPU_MAX_QUEUE = 64  # two full batches of single-image requests per instance
GPU_QUEUE_TIMEOUT_US = 5_000_000
# Sixteen: a batch job keeps up to 16 single-image requests in flight without a refusal (a queue of
# four refused eight single-image clients: the soak in docs/robustness.md); sixteen 32-image requests
# are 308 MB of pixel_values, and the timeout refuses whatever would wait longer than it.
CPU_MAX_QUEUE = 16
CPU_QUEUE_TIMEOUT_US = 30_000_000  # the full ViT-L/14 on two cores: about a second per image
DECODER_MAX_QUEUE = 8  # requests of encoded files: eight clients beside the decoders' own
POSTPROCESS_MAX_QUEUE = 128  # a few KB per image: room for four embedder batches of single-image requests
POSTPROCESS_QUEUE_TIMEOUT_US = 10_000_000
