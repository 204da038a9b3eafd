"""transferkit: from a folder of images to a fine-tuned classifier by transfer learning."""

__version__ = "0.1.0"
