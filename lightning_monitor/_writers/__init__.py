"""One writer per backend (TensorBoard, wandb, scalars only, in memory), the one failure guard every write goes
through, the backend contract, media conversion and TensorBoard's checksum in C."""
