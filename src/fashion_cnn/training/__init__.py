"""The training layer: run configuration and recipes, the loop, optimizers, callbacks,
checkpoints, the run directory, several processes, and the run functions (train, resume,
evaluate_run, load_model). Imports only from the data and model layers and the ground floor."""
