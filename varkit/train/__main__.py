"""``python -m varkit.train {tokenizer,generator} …`` (what torchrun launches): ``varkit train …``."""
import sys

from ..cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
