"""The training stages (``pretrain``, ``finetune``): DeepSpeed ZeRO training of the detector from shards to
a model directory. Entry points: :func:`pipeline.train.stage.run_training` (every launcher's worker) and
:func:`pipeline.train.stage.run` (the CLI)."""
