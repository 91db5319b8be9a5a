"""End-to-end evaluation: answer-token loss, KL and top-1 agreement, paired statistics."""
