"""BERT's special tokens and the fixed ids every tokenizer of this codebase gives them.

[PAD] [UNK] [CLS] [SEP] [MASK] are ids 0..4 in every tokenizer trained here or given by the
user, so the model, masking and packing code use these constants instead of asking it.
"""

SPECIAL_PIECES = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
