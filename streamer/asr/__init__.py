"""Model maths: features, encoder, transducer and CTC heads, tokenizer and checkpoints.

Knows torch, numpy, sentencepiece and yaml; never asyncio or network libraries.
"""
