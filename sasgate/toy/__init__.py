"""The embedded model organism of refusal: grammar, tokenizer and training."""
