"""The evaluation stage: COCO scoring with and without test-time augmentation (``python -m pipeline eval``).

Modules: ``config`` (EvalConfig, TTAConfig), ``coco_scoring`` (the only home of the COCO scorers),
``detections`` (COCO results records), ``ground_truth`` (COCO ground truth from shard records), ``tta``
(augmentations, inverse box transforms, merges, the TTA wrapper), ``engine`` (distributed inference,
gather, scoring; reused by training), ``plots`` (the only home of matplotlib) and ``stage`` (the CLI stage).
"""
