"""Training, one concern per module, in the order a run meets them:

- ``plan``: every check before anything is created; ``plan_run(cfg)`` returns the Plan;
- ``machine``: the device, CPU features, glibc's allocator, the dtype and autocast;
- ``step``: the split of the global batch, one optimizer step, the optimizer and schedule builders;
- ``signals``: Ctrl-C / SIGTERM finish the step, checkpoint and stop;
- ``trainer``: the Trainer (open, the loop in ``fit``, checkpoints, close) and ``train(cfg)``.

Import from the module that owns a name (``from gptx.training.trainer import train``): evaluation
and ``gptx bench`` use ``machine`` and ``step`` without loading the trainer.
"""
