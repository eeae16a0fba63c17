"""Glue between training and evaluation: the task metric every `eval_steps`, logged like the loss."""

from __future__ import annotations

from transformers import TrainerCallback

from phivision.train.config import TrainConfig


class TaskMetricCallback(TrainerCallback):
    """Greedy generation on the samples the eval loss uses (checked, up to `eval_samples`); logs `eval_<metric>`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.trainer = None

    def attach(self, trainer) -> None:
        """The metric is logged through the trainer, so it reaches metrics.jsonl, the bar and TensorBoard."""
        self.trainer = trainer

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        from phivision.evaluate.evaluation import evaluate_dataset
        from phivision.processing.processor import Phi3VProcessor

        processor = Phi3VProcessor.from_pretrained(self.config.model, num_crops=self.config.num_crops)
        was_training = model.training
        model.eval()
        metrics = evaluate_dataset(
            model, processor, self.config.eval_data, self.config.eval_image_root, self.config.metric,
            self.config.eval_batch_size, self.config.max_new_tokens, progress=state.is_world_process_zero,
            lines=self.trainer.eval_dataset.indices, description="eval generate",
        )
        model.train(was_training)
        if metrics:
            self.trainer.log({f"eval_{metrics['metric']}": metrics[metrics["metric"]]})
        return control


def task_metric_callbacks(config: TrainConfig) -> list[TrainerCallback]:
    return [TaskMetricCallback(config)] if config.eval_data and config.eval_steps else []
