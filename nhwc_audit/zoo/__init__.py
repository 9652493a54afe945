"""Public models in; audits out. ``models`` builds torchvision, timm, diffusers, MONAI and smp
models from code or configs with random weights (never a download); ``atlas`` audits them into
an index page. Model code: its frames count as the user's for source lines.
"""
