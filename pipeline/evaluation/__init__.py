"""The evaluation stage: COCO scoring with and without test-time augmentation (``python -m pipeline eval``).

Modules: ``config`` (EvalConfig, TTAConfig), ``samples`` (decoded originals + records from the shards,
each image on one rank), ``tta`` (augmentations, inverse box transforms, one-to-one and NMS merges, the
TTA wrapper), ``detections`` (rounded COCO results records, canonical order), ``ground_truth`` (the COCO
ground truth of the evaluated images), ``coco_scoring`` (the only home of the COCO scorers), ``engine``
(distributed inference, gather, scoring, ATD), ``outputs`` (metrics.json, detections*.json, figures,
the tracking hook), ``plots`` (the only home of matplotlib) and ``stage`` (the CLI stage and
``run_evaluation``, the entry point of the training stages' periodic evaluation).
"""
