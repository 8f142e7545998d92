"""Support code of the cocomix repository: token files, checkpoints, weights and hashes, locks and
checks, the label cache, SAE training, the concept dictionary, evaluation and FLOPs. The method
itself is in the root files (model.py, sae.py, train.py, sample.py); nothing here imports them."""
