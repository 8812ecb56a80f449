"""The training engine: typed batches, the actor (one worker's model, loss and optimizer), the single-controller
loop (`trainer.Distiller`) and checkpoints."""
