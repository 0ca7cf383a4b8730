"""Tag vocabularies shipped with the annotators (``default_vocab.txt``: COCO 80 + ADE20K 150 + sample-data words)."""
