"""Fold a LoRA adapter into its base model and write a plain Hugging Face folder: lora/merge.py's
command line, runnable by path from any folder as train.py and predict.py are.

    python merge.py --model BASE_DIR --adapter ckpt.safetensors --out OUT_DIR [--precision int8]
"""
from common.errors import cli_entry
from lora.merge import main

if __name__ == "__main__":
    cli_entry(main)
