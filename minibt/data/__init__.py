"""User data in: seed (instruction, output) pairs and the unlabelled corpus."""

from minibt.data.corpus import iter_documents, prepare_corpus
from minibt.data.seed import load_seed

__all__ = ["iter_documents", "load_seed", "prepare_corpus"]
