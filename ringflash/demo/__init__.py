"""The ``ringflash demo`` job: a small LM trained and sampled with its sequence sharded."""
