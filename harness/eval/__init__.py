"""End-to-end evaluation: answer-token loss, KL and top-1 agreement, GSM8K, paired statistics."""

# The name of the unquantized model wherever runs or cases are named by format (the "reference"
# of every loss, KL and GSM8K comparison).
REFERENCE = "reference"
