"""dgrun's built-in optimization steps, one module per family. Importing them must not import torch.

Each module registers its optimizers with a `@hookimpl dgrun_register_optimizers`, exactly as a plugin
does; `dgrun.builtin` lists the modules, in the order `dgrun steps` shows them.
"""
