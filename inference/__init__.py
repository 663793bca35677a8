"""Model loading, image preprocessing and the code that runs inside worker processes.

Nothing here imports `service/`: the worker side must stay usable on its own (and, later,
on other machines).
"""
