"""The embedded vision suite (``backbone=embedded``): a small CLIP-architecture vision tower
pre-trained on scikit-learn's 8x8 digits and one fine-tuned expert per task.

``spec`` (``EmbeddedSpec``), ``data`` (the tasks' transforms and splits), ``build``
(pre-training, fine-tuning, cache), ``adapter`` (``EmbeddedBackbone``), ``pool``
(``EmbeddedTaskPool``).
"""
