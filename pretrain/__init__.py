"""Contrastive image-text pretraining on DeepSpeed.

    shards (data_prep) --data.TrainLoader----> per-rank balanced, resumable batches: images, token ids
    batch              --models.CLIP---------> unit-norm image / text embeddings, temperature
    embeddings         --losses.ContrastiveLoss-> all-gather contrastive loss (task.ContrastiveTask: model + loss)
    loss               --engine--------------> DeepSpeed engine: ZeRO 0-3, bf16, accumulation (only DeepSpeed import)
    engine             --trainer.Trainer-----> steps, checkpoint (exact resume), monitor (W&B), evaluate
    checkpoint         --export--------------> model.safetensors + config.yaml + tokenizer.model, no DeepSpeed needed

Entry point: ``python -m pretrain.train`` (hydra; ``conf/train.yaml``), usually via ``python -m launch``.
"""
