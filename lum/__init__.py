"""The behaviour LM: tokenizer, presets, pretraining, evaluation, embedding engines and the batch embedding job."""
