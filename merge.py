"""Fold a LoRA adapter into its base model and write a plain Hugging Face folder: lora/merge.py's
command line, runnable by path from any folder as train.py and predict.py are.

    python merge.py --model BASE_DIR --adapter ckpt.safetensors --out OUT_DIR [--precision int8]
"""
import sys

from lora.merge import main

if __name__ == "__main__":
    sys.exit(main())
