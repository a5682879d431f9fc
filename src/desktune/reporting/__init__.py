"""`desktune report`: a finished (or running) run folder as one self-contained HTML page, or as TensorBoard scalars.

It reads the run's files only (metrics.jsonl, eval.json, demo_answers.json, config.yaml) and imports neither
torch nor the training or model layers; `tensorboard.py` imports torch's SummaryWriter inside its one function.
"""
