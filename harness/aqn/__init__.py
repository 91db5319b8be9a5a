"""AQN (QeRL's adaptive quantization noise): schedules, noise on weights, strategies, training."""
