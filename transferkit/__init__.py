"""transferkit: from a folder of images to a fine-tuned classifier by transfer learning.

    import transferkit
    run = transferkit.train("photos/", "runs/photos", epochs_finetune=2)
    run.predict(["new.jpg"])
    transferkit.load("runs/photos").evaluate("photos/")
"""

__version__ = "0.1.0"
__all__ = ["__version__", "load", "train"]


def __getattr__(name: str):
    # Lazy, so `import transferkit` (and the CLI's --help) does not pay for importing torch.
    if name in ("train", "load"):
        from transferkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'transferkit' has no attribute '{name}'")
