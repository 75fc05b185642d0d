"""Fine-tuning: methods and their trainable sets, gap selection, semantic init, schedules, the training job."""
